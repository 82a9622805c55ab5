"""Results of a run: read the JSONL, aggregate over seeds, write the markdown report and plots."""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable

import numpy as np

from lora_jax.errors import InputFileError


def read_results(path: str | os.PathLike) -> list[dict]:
    """The result records of ``results.jsonl`` (a missing file is an empty run).

    A last line that is not JSON (cut short: a run killed mid-write, a full disk) is skipped
    with a warning, so its cell counts as not done; a bad line anywhere else is an
    :class:`~lora_jax.errors.InputFileError` naming the line.
    """
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i < len(lines) - 1:
                raise InputFileError(
                    f"{os.fspath(path)}, line {n}, is not a JSON record ({err}). Fix: delete that "
                    "line (its cell is then run again on resume)."
                ) from err
            warnings.warn(
                f"{os.fspath(path)}: its last line was cut short ({err}); skipped it, so that "
                "cell is not counted as done.",
                stacklevel=2,
            )
    return records


def drop_torn_tail(path: str | os.PathLike) -> bool:
    """Cuts a torn last line off ``results.jsonl`` before records are appended to it.

    Returns whether a line was dropped. A complete last record that only lacks its newline
    gets one, so the next record starts on a line of its own.
    """
    if not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        data = f.read()
    body = data.rstrip()
    start = body.rfind(b"\n") + 1
    try:
        json.loads(body[start:] or b"{}")
    except ValueError:
        warnings.warn(
            f"{os.fspath(path)}: its last line was cut short (a run stopped mid-write); dropped "
            "it, and its cell runs again.",
            stacklevel=2,
        )
        with open(path, "r+b") as f:
            f.truncate(start)
        return True
    if body and not data.endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")
    return False


def column(record: dict) -> str:
    """The report column of a record: ``zero_shot``, ``head``, ``lora r=4``, ``full``, ..."""
    return f"{record['method']} r={record['rank']}" if record.get("rank") else record["method"]


def _column_order(records: Iterable[dict]) -> list[str]:
    keys = {(r["method"], r.get("rank") or 0) for r in records}
    order = {"zero_shot": 0, "head": 1, "lora": 2, "full": 3}
    ordered = sorted(keys, key=lambda mr: (order.get(mr[0], 9), mr[1]))
    return [f"{m} r={r}" if r else m for m, r in ordered]


def aggregate(records: list[dict], metric: str = "test_accuracy") -> dict[tuple[str, str], list]:
    """``{(task, column): [metric per seed]}``."""
    cells: dict[tuple[str, str], list] = defaultdict(list)
    for r in records:
        cells[r["task"], column(r)].append(r[metric])
    return cells


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def markdown_table(records: list[dict], metric: str = "test_accuracy") -> str:
    """Task x method table of ``mean +- std (n seeds)`` in percent."""
    columns = _column_order(records)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    cells = aggregate(records, metric)
    lines = ["| task | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for task in tasks:
        row = []
        for col in columns:
            values = cells.get((task, col))
            if not values:
                row.append("")
                continue
            mean, std = mean_std(values)
            row.append(f"{100 * mean:.1f} ± {100 * std:.1f} ({len(values)})")
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def gains_table(records: list[dict], metric: str = "test_accuracy") -> str:
    """Paired gain of each trained column over zero-shot, per task; '' without zero-shot.

    Zero-shot does not depend on the seed (same model, same test set), so the gain of a seed is
    its accuracy minus the zero-shot accuracy. Columns: mean gain ± std over seeds (points),
    the smallest gain, how many seeds beat zero-shot, and the one-sample t statistic
    mean / (std / sqrt(n)) of the gains (t > 2.9 is p < 0.05 one-sided at n = 3; > 2.1 at 5).
    """
    cells = aggregate(records, metric)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    lines = [
        "| task | method | gain (points) | smallest gain | seeds above | t |",
        "|---|---|---|---|---|---|",
    ]
    for task in tasks:
        zero = cells.get((task, "zero_shot"))
        if not zero:
            continue
        for col in _column_order(records):
            values = cells.get((task, col))
            if col == "zero_shot" or not values:
                continue
            gains = 100 * (np.asarray(values, np.float64) - np.mean(zero))
            mean, std = mean_std(list(gains))
            t = mean / (std / np.sqrt(gains.size)) if gains.size > 1 and std > 0 else float("nan")
            lines.append(
                f"| {task} | {col} | {mean:+.1f} ± {std:.1f} | {gains.min():+.1f} | "
                f"{int((gains > 0).sum())}/{gains.size} | {t:.1f} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def ntk_table(records: list[dict]) -> str:
    """Task x rank table of the NTK-regime fields (``ntk_*``), means over seeds; '' if none."""
    from experiments.ntk_analysis import COLUMNS

    rows = [r for r in records if "ntk_acc_trained" in r]
    if not rows:
        return ""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["task"], r["rank"]].append(r)
    lines = [
        "| task | rank | " + " | ".join(COLUMNS.values()) + " |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for (task, rank), group in groups.items():
        cells = []
        for key in COLUMNS:
            values = [r[key] for r in group if r.get(key) is not None]
            cells.append(f"{np.mean(values):.3f}" if values else "")
        lines.append(f"| {task} | {rank} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run_dir: str, config: dict, records: list[dict], plot_files: list[str]) -> str:
    """Writes ``report.md`` atomically (temp file + rename) and returns its path."""
    seconds = sum(r.get("seconds", 0.0) for r in records)
    parts = [
        f"# {config['name']}",
        "",
        f"Model `{config['model']}`, k = {config['k']} per class, {config['steps']} steps, "
        f"loss `{config['loss']}`, seeds {config['seeds']}. Test accuracy in %, "
        "mean ± std over seeds (number of seeds); dev-selected checkpoints.",
        "",
        markdown_table(records),
        "",
        f"{len(records)} cells, {seconds / 60:.1f} min of compute.",
        "",
    ]
    if gains := gains_table(records):
        parts += ["## Gain over zero-shot (paired by seed)", "", gains, ""]
    if ntk := ntk_table(records):
        parts += [
            "## NTK regime (means over seeds)",
            "",
            "Test accuracy of real LoRA fine-tuning, of the linearized LoRA model trained the "
            "same way, and of eNTK kernel regression; argmax agreement with the fine-tuned "
            "model; relative change of the train x train eNTK and of the adapted weights; "
            "relative linearization error at the end of training.",
            "",
            ntk,
            "",
        ]
    parts += [f"![{os.path.basename(p)}]({os.path.relpath(p, run_dir)})" for p in plot_files]
    path = os.path.join(run_dir, "report.md")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(parts) + "\n")
    os.replace(tmp, path)
    return path


def plot_accuracy_vs_rank(run_dir: str, records: list[dict]) -> list[str]:
    """One panel per task: LoRA test accuracy vs rank (mean +- std), baselines as lines."""
    lora = [r for r in records if r["method"] == "lora"]
    if not lora:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in records))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        by_rank: dict[int, list] = defaultdict(list)
        for r in lora:
            if r["task"] == task:
                by_rank[r["rank"]].append(100 * r["test_accuracy"])
        ranks = sorted(by_rank)
        stats = [mean_std(by_rank[k]) for k in ranks]
        ax.errorbar(
            ranks,
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            marker="o",
            capsize=3,
            label="LoRA",
        )
        for i, method in enumerate(("zero_shot", "head", "full")):
            values = [
                100 * r["test_accuracy"]
                for r in records
                if r["task"] == task and r["method"] == method
            ]
            if values:
                ax.axhline(np.mean(values), linestyle="--", color=f"C{i + 1}", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.join(run_dir, "plots"), exist_ok=True)
    path = os.path.join(run_dir, "plots", "accuracy_vs_rank.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
