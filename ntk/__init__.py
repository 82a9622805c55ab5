"""ntk: NTK-regime tools built on neural-tangents."""
