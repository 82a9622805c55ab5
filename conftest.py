"""Root pytest setup, for the tests and the docstring examples alike: offline and on CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No persistent compilation cache in the user's home (tests of the cache give a tmp dir).
os.environ.setdefault("LORA_JAX_COMPILATION_CACHE", "off")
