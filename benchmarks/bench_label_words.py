"""Compiles of a two-task grid: label words as constants of each task's programs, or as their
argument (one program for tasks of one shape) and both tasks' cells in one job.

  uv run python benchmarks/bench_label_words.py
  uv run python benchmarks/bench_label_words.py --source /path/to/an/older/tree   # before

Two task files of one shape (K = 2, the same texts, label words ``terrible/great`` and
``bad/good``) on the tiny RoBERTa of ``lora_jax.testing``, LoRA ranks 1 and 2, seeds 13 and 21,
6 steps at batch 4, evaluated every 2 steps: ``experiments.run --no-vectorize`` (8 cells one at
a time) and ``--vectorize`` (one job per shape), each in a fresh run directory of one process.
Counted: XLA compilations of the training chunk (``jit(chunk)``) and of the job's predict
(``jit(vpredict)``: dev and test), from ``jax_log_compiles``; and each run's wall time
(compiles included: the tiny model's steps cost little).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import pathlib
import re
import sys
import tempfile
import time

WORDS = {"words_a": ["terrible", "great"], "words_b": ["bad", "good"]}
# fmt: off
POSITIVE = ["a great film", "it was good", "really great", "great story", "a good cast",
            "good music", "great ending", "really good", "the movie is good", "the plot is good"]
NEGATIVE = ["a terrible film", "it was bad", "really terrible", "bad story", "a bad cast",
            "boring music", "terrible ending", "really bad", "the film is bad", "the plot is bad"]
# fmt: on


def task_files(directory: pathlib.Path) -> list[pathlib.Path]:
    for name, rows in (
        ("train.csv", [(t, "positive") for t in POSITIVE] + [(t, "negative") for t in NEGATIVE]),
        ("test.csv", [("great music", "positive"), ("bad music", "negative")]),
    ):
        with open(directory / name, "w", newline="") as f:
            csv.writer(f).writerows([("text", "sentiment"), *rows])
    paths = []
    for name, words in WORDS.items():
        spec = {"name": name, "train": "train.csv", "test": "test.csv", "text_columns": ["text"],
                "label_column": "sentiment", "label_names": ["negative", "positive"],
                "label_words": words, "template": "{0} It was {mask} ."}  # fmt: skip
        paths.append(directory / f"{name}.json")
        paths[-1].write_text(json.dumps(spec))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", help="import lora_jax and experiments from this tree")
    args = parser.parse_args()
    if args.source:
        sys.path.insert(0, args.source)
    import jax

    from experiments.run import main as run
    from lora_jax.testing import make_tiny_checkpoint

    counts: dict[str, int] = {}

    class Count(logging.Handler):
        def emit(self, record):
            if m := re.search(r"Finished XLA compilation of jit\((\w+)\)", record.getMessage()):
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1

    logging.getLogger("jax").addHandler(Count())
    logging.getLogger("jax").setLevel(logging.DEBUG)
    jax.config.update("jax_log_compiles", True)
    tmp = pathlib.Path(tempfile.mkdtemp())
    model = str(make_tiny_checkpoint(tmp / "roberta"))
    a, b = task_files(tmp)
    rows = []
    for flag in ("--no-vectorize", "--vectorize"):
        counts.clear()
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the run's report tables
            run(["--model", model, "--name", "g", "--task-file", str(a), str(b), "--methods",
               "lora", "--ranks", "1", "2", "--seeds", "13", "21", "--k", "4", "--steps", "6",
               "--eval-every", "2", "--batch-size", "4", "--max-length", "32",
               "--out", str(tmp / flag), flag])  # fmt: skip
        seconds = time.perf_counter() - start
        rows.append((flag, counts.get("chunk", 0), counts.get("vpredict", 0), seconds))
    print("| run | training-chunk compiles | predict compiles | wall s |")
    print("|---|---|---|---|")
    for flag, chunk, predict, seconds in rows:
        print(f"| {flag} | {chunk} | {predict} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
