"""Writes the K = 3 task ``trec3``: TREC's HUM / LOC / NUM questions (rows of the committed
``lora_jax/tasks/data/trec`` files, same train / test split). Run from the repository root:
``uv run python experiments/tasks/trec3/make_trec3.py``."""

from __future__ import annotations

import gzip
import json
import os

from lora_jax.tasks.registry import data_dir, read_jsonl

CLASSES = ("HUM", "LOC", "NUM")


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for split in ("train", "test"):
        rows = read_jsonl(data_dir() / "trec" / f"{split}.jsonl.gz")
        keep = [{"text": r["text"], "label": r["coarse"]} for r in rows if r["coarse"] in CLASSES]
        path = os.path.join(here, f"{split}.jsonl.gz")
        with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime 0: the same bytes every run
            f.write("".join(json.dumps(r) + "\n" for r in keep).encode())
        print(f"{path}: {len(keep)} rows")


if __name__ == "__main__":
    main()
