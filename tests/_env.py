"""The environment of the tests' subprocesses that simulate several CPU devices."""

import os


def simulated_devices(devices: int, **extra: str) -> dict[str, str]:
    """This process's environment on CPU with ``devices`` simulated devices, the session's own
    ``XLA_FLAGS`` (the root ``conftest.py``'s) kept, and ``extra`` variables on top."""
    flags = os.environ.get("XLA_FLAGS", "")
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
        **extra,
    }
