"""Memory a computation may use and what a compiled program needs (XLA's memory analysis)."""

from __future__ import annotations

import os
from typing import Any

import jax

__all__ = ["available_memory", "gib", "required_bytes"]


def available_memory(device: jax.Device | None = None) -> int:
    """Bytes available for one computation on ``device`` (default: this process's first
    device).

    Accelerators: ``bytes_limit - bytes_in_use`` from ``memory_stats()``. CPU: ``MemAvailable``
    from ``/proc/meminfo`` (else total physical memory).
    """
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def required_bytes(exe: Any) -> int:
    """Peak bytes of a compiled program: arguments + outputs + temporaries (less aliasing)."""
    m = exe.memory_analysis()
    if m is None:
        return 0
    peak = getattr(m, "peak_memory_in_bytes", 0) or 0
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return int(max(peak, total - m.alias_size_in_bytes))


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
