"""Experiments: python -m experiments.run.

On a machine with no accelerator (no TPU device nodes ``/dev/accel*`` or ``/dev/vfio``, no
NVIDIA ``/dev/nvidia*``) and ``JAX_PLATFORMS`` unset, the commands run with
``JAX_PLATFORMS=cpu``: what JAX would pick anyway, without the pages of errors that an installed
libtpu (the dev group's compile-only planning) prints while it looks for a TPU that is not there.
On a machine without NVIDIA device nodes, ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` (unless set)
keeps an installed CUDA plugin (the ``cuda-plan`` extra, in the dev group) from printing a
traceback about the CUDA libraries it needs only to run on a GPU.
"""

import glob
import os

if "JAX_PLATFORMS" not in os.environ and not any(
    glob.glob(pattern) for pattern in ("/dev/accel*", "/dev/vfio", "/dev/nvidia*")
):
    os.environ["JAX_PLATFORMS"] = "cpu"
if not glob.glob("/dev/nvidia*"):
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
