"""Root pytest setup, for the tests and the docstring examples alike: offline and on CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# An installed CUDA plugin (the dev group's compile-only GPU planning) checks the CUDA libraries
# at JAX's start-up and prints a traceback without them; the tests run on CPU.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No persistent compilation cache in the user's home (tests of the cache give a tmp dir).
os.environ.setdefault("LORA_JAX_COMPILATION_CACHE", "off")
# The tests' models are tiny, so their time goes to compiling, not running: XLA's backend at -O0
# compiles about twice as fast. Subprocesses keep these flags (tests/_env.py); the numbers a test
# compares are computed under the same flags.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()
