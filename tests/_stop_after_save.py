"""``python tests/_stop_after_save.py SIGNAL ARGS...``: ``python -m experiments.run ARGS`` in a
process that sends itself SIGNAL (``KILL``: it dies; ``STOP``: it hangs, its sockets open) right
after its first checkpoint is written: a host lost mid-run, at a known point."""

import os
import signal
import sys

from experiments import run
from lora_jax import checkpoint


def main() -> None:
    real_save = checkpoint.save

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        os.kill(os.getpid(), getattr(signal, "SIG" + sys.argv[1]))

    checkpoint.save = save_then_stop
    run.main(sys.argv[2:])


if __name__ == "__main__":
    main()
