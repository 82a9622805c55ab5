"""Results of a run: read the JSONL, aggregate over seeds, write the markdown report and plots."""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable

import numpy as np

from experiments import stats
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
    from experiments.ntk_analysis import COLUMNS, OPTIONAL_COLUMNS

    rows = [r for r in records if "ntk_acc_trained" in r]
    if not rows:
        return ""
    present = {k: v for k, v in OPTIONAL_COLUMNS.items() if any(r.get(k) is not None for r in rows)}
    COLUMNS = {**COLUMNS, **present}  # noqa: N806 - the imported table, extended
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


# ----------------------------------------------------------------------------- rank statistics


def lora_groups(
    records: list[dict], metric: str = "test_accuracy"
) -> dict[tuple, dict[int, dict[int, float]]]:
    """``{(encoder or None, task): {rank: {seed: metric}}}`` of the LoRA records.

    The encoder is the record's ``model`` (set on the records of a several-encoder run), else
    None; records without ``metric`` are left out.
    """
    groups: dict[tuple, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r["method"] == "lora" and r.get(metric) is not None:
            groups[r.get("model"), r["task"]][r["rank"]][r["seed"]] = r[metric]
    return groups


def best_mean_rank(by_rank: dict[int, dict[int, float]], among: Iterable[int] | None = None) -> int:
    """The rank of highest mean over seeds (ties: the smaller rank), over ``among`` (default:
    every rank of ``by_rank``).

    Args:
      by_rank: ``{rank: {seed: value}}``, as :func:`lora_groups` gives per task.
      among: the candidate ranks (each in ``by_rank``, with at least one seed).
    """
    ranks = sorted(by_rank if among is None else among)
    return min(ranks, key=lambda rank: -float(np.mean(list(by_rank[rank].values()))))


def group_label(group: tuple) -> str:
    """``task``, or ``encoder | task`` for a group of :func:`lora_groups` with an encoder."""
    model, task = group
    return f"{model} | {task}" if model is not None else task


def _table(header: str, records: list[dict], rows: list[str]) -> str:
    """A markdown table of ``rows`` under ``header``; '' without rows. The header and each row
    are their cells separated by ``" | "``.

    An ``encoder`` column comes first when a record names its model; the rows' first cell,
    a :func:`group_label`, then holds the encoder and the task.
    """
    if not rows:
        return ""
    columns = header.split(" | ")
    if any("model" in r for r in records):
        columns = ["encoder", *columns]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += [f"| {row} |" for row in rows]
    return "\n".join(lines)


def _points(mean: float, half: float, sign: bool = False) -> str:
    """``62.1 ± 3.4`` (percent points; the half-width of a 95% interval), or ``62.1`` (n = 1)."""
    text = f"{100 * mean:+.1f}" if sign else f"{100 * mean:.1f}"
    return text if np.isnan(half) else f"{text} ± {100 * half:.1f}"


def _p(value: float) -> str:
    return "" if np.isnan(value) else f"{value:.3f}"


def rank_test_table(
    records: list[dict], low: int = 1, high: int = 12, metric: str = "test_accuracy"
) -> str:
    """Per task (and encoder): is rank ``low`` within noise of rank ``high``? '' if no task has
    both (``high`` falls back to the largest rank above ``low`` when the run has no ``high``).

    Columns: seeds paired; mean accuracy of each rank (%); their difference ``low - high`` with
    its 95% t interval over seeds (points); the paired t statistic and its degrees of freedom;
    the two-sided t-test p-value; the exact sign-flip test's p-value (`stats.sign_flip_p`); and
    the verdict: ``within noise`` when the interval contains 0 (p >= 0.05), else which is
    better.
    """
    rows = []
    for group, by_rank in lora_groups(records, metric).items():
        above = [r for r in by_rank if r > low]
        if low not in by_rank or not above:
            continue
        top = high if high in by_rank else max(above)
        test = stats.paired_test(by_rank[low], by_rank[top])
        if test is None:
            continue
        if test.n < 2:
            verdict = "one seed: no test"
        elif test.within_noise:
            verdict = "within noise"
        else:
            verdict = f"r={low} better" if test.diff > 0 else f"r={top} better"
        t = "" if np.isnan(test.t) else f"{test.t:.2f} ({test.df})"
        rows.append(
            f"{group_label(group)} | {low} vs {top} | {test.n} | {100 * test.mean_a:.1f} | "
            f"{100 * test.mean_b:.1f} | {_points(test.diff, test.half, sign=True)} | {t} | "
            f"{_p(test.p)} | {_p(test.p_sign_flip)} | {verdict}"
        )
    header = "task | ranks | seeds | acc low | acc high | low − high (95% CI) | t (df) | "
    header += "p (t test) | p (sign flip) | verdict"
    return _table(header, records, rows)


def best_rank_table(records: list[dict], metric: str = "test_accuracy") -> str:
    """Per task (and encoder): the rank of highest mean accuracy over seeds, with its 95% t
    interval; the ranks whose paired test against it is within noise (p >= 0.05, the best
    included); and rank 1's paired difference from the best with its p-value. '' if no LoRA.
    """
    rows = []
    for group, by_rank in lora_groups(records, metric).items():
        best = best_mean_rank(by_rank)
        mean, half = stats.t_interval(list(by_rank[best].values()))
        tied = []  # left empty with one seed: nothing can be told apart
        for rank in sorted(by_rank):
            test = stats.paired_test(by_rank[rank], by_rank[best])
            if test is not None and test.n >= 2 and test.within_noise:
                tied.append(str(rank))
        one = stats.paired_test(by_rank[1], by_rank[best]) if 1 in by_rank else None
        vs_one = ""
        if one is not None and best != 1:
            vs_one = _points(one.diff, float("nan"), sign=True)
            vs_one += f" ({_p(one.p)})" if one.n >= 2 else ""
        rows.append(
            f"{group_label(group)} | {best} | {_points(mean, half)} | {len(by_rank[best])} | "
            f"{', '.join(tied)} | {vs_one}"
        )
    header = "task | best rank | accuracy (95% CI) | seeds | ranks within noise of best | "
    return _table(header + "r=1 − best (p)", records, rows)


def ntk_gap_table(records: list[dict]) -> str:
    """Per task (and encoder) and rank: fine-tuned test accuracy minus the linearized model's
    and minus eNTK kernel regression's, for the same cells (``ntk=True`` runs), as the mean
    paired difference with its 95% t interval over seeds (points). '' without NTK fields."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("ntk_acc_trained") is not None:
            groups[r.get("model"), r["task"], r["rank"]].append(r)
    # The SGD eNTK's column as before; a column per other kernel (ntk.Kernel) the run used.
    kernels = {
        "ntk_acc_kernel_asigngd": "A-SignGD kernel",
        "ntk_acc_kernel_signgd": "SignGD kernel",
    }
    used = [k for k in kernels if any(r.get(k) is not None for r in records)]
    sgd = not used or any(r.get("ntk_acc_kernel") is not None for r in records)
    columns = ["ntk_acc_linearized_trained"] + ["ntk_acc_kernel"] * sgd + used
    kernel_head = "FT − SGD kernel (95% CI)" if used else "FT − kernel (95% CI)"
    heads = {
        "ntk_acc_linearized_trained": "FT − linearized (95% CI)",
        "ntk_acc_kernel": kernel_head,
    }
    heads.update({k: f"FT − {kernels[k]} (95% CI)" for k in used})
    rows = []
    for (model, task, rank), group in groups.items():
        fine_tuned = [r["ntk_acc_trained"] for r in group]
        cells = [_points(*stats.t_interval(fine_tuned))]
        for other in columns:
            gaps = [r["ntk_acc_trained"] - r[other] for r in group if r.get(other) is not None]
            cells.append(_points(*stats.t_interval(gaps), sign=True) if gaps else "")
        rows.append(f"{group_label((model, task))} | {rank} | {len(group)} | " + " | ".join(cells))
    header = " | ".join(["task", "rank", "seeds", "fine-tuned", *(heads[c] for c in columns)])
    return _table(header, records, rows)


def write_report(run_dir: str, config: dict, records: list[dict], plot_files: list[str]) -> str:
    """Writes ``report.md`` atomically (temp file + rename) and returns its path.

    Records of several encoders (a ``models`` run) carry a ``model`` key: the accuracy tables
    then come one section per encoder, and the rank statistics have an encoder column.
    """
    seconds = sum(r.get("seconds", 0.0) for r in records)
    encoders = list(dict.fromkeys(r["model"] for r in records if "model" in r))
    what = (
        f"Model `{config['model']}`"
        if not encoders
        else "Encoders " + ", ".join(f"`{m}`" for m in encoders)
    )
    parts = [
        f"# {config['name']}",
        "",
        f"{what}, k = {config['k']} per class, {config['steps']} steps, "
        f"loss `{config['loss']}`, seeds {config['seeds']}. Test accuracy in %, "
        "mean ± std over seeds (number of seeds); dev-selected checkpoints.",
        "",
    ]
    if encoders:
        for model in encoders:
            own = [r for r in records if r.get("model") == model]
            parts += [f"## {model}", "", *_accuracy_sections(own, "###")]
    else:
        parts += _accuracy_sections(records, "##")
    parts += [f"{len(records)} cells, {seconds / 60:.1f} min of compute.", ""]
    if tests := rank_test_table(records):
        parts += [
            "## Rank 1 vs rank 12 (or the largest rank run; paired by seed)",
            "",
            "Differences in accuracy points with the 95% t interval over seeds; p-values are "
            "two-sided: the paired t test (the verdict) and the exact sign-flip test (whose "
            "smallest possible p is 2/2^n: 0.0625 at 5 seeds, 0.25 at 3). 'within noise' means "
            "the interval contains 0; its width is the difference these seeds could detect.",
            "",
            tests,
            "",
        ]
    if best := best_rank_table(records):
        parts += [
            "## Best rank",
            "",
            "The rank of highest mean test accuracy, with its 95% t interval over seeds (picked "
            "as the best on the test set, so its mean is optimistic); the ranks a paired t test "
            "cannot tell from it (p >= 0.05); rank 1's paired difference from it (points) and "
            "that test's p.",
            "",
            best,
            "",
        ]
    if gaps := ntk_gap_table(records):
        parts += [
            "## Fine-tuning vs NTK predictions (paired by cell)",
            "",
            "Test accuracy of real LoRA fine-tuning minus that of the linearized LoRA model "
            "trained the same way and of eNTK kernel regression, on the same cells; mean ± 95% "
            "t interval over seeds, in points (positive: fine-tuning is better).",
            "",
            gaps,
            "",
        ]
    parts += [f"![{os.path.basename(p)}]({os.path.relpath(p, run_dir)})" for p in plot_files]
    path = os.path.join(run_dir, "report.md")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(parts) + "\n")
    os.replace(tmp, path)
    return path


def _accuracy_sections(records: list[dict], level: str) -> list[str]:
    """The accuracy table, the gains over zero-shot and the NTK-regime table of one encoder."""
    parts = [markdown_table(records), ""]
    if gains := gains_table(records):
        parts += [f"{level} Gain over zero-shot (paired by seed)", "", gains, ""]
    if ntk := ntk_table(records):
        parts += [
            f"{level} NTK regime (means over seeds)",
            "",
            "Test accuracy of real LoRA fine-tuning, of the linearized LoRA model trained the "
            "same way, and of eNTK kernel regression; argmax agreement with the fine-tuned "
            "model; relative change of the train x train eNTK and of the adapted weights; "
            "relative linearization error at the end of training.",
            "",
            ntk,
            "",
        ]
    return parts


def plot_accuracy_vs_rank(run_dir: str, records: list[dict]) -> list[str]:
    """One panel per task: LoRA test accuracy vs rank (mean +- std), baselines as lines.

    Records of several encoders (with a ``model`` key) give one LoRA curve per encoder, and
    each baseline line in that encoder's color.
    """
    lora = [r for r in records if r["method"] == "lora"]
    if not lora:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in records))
    encoders = list(dict.fromkeys(r.get("model") for r in records))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        ranks: set[int] = set()
        for e, encoder in enumerate(encoders):
            own = [r for r in records if r["task"] == task and r.get("model") == encoder]
            by_rank: dict[int, list] = defaultdict(list)
            for r in own:
                if r["method"] == "lora":
                    by_rank[r["rank"]].append(100 * r["test_accuracy"])
            ranks |= set(by_rank)
            xs = sorted(by_rank)
            stats_ = [mean_std(by_rank[k]) for k in xs]
            name = "LoRA" if encoder is None else f"LoRA {encoder}"
            color = "C0" if encoder is None else f"C{e}"
            ax.errorbar(
                xs,
                [m for m, _ in stats_],
                yerr=[sd for _, sd in stats_],
                marker="o",
                capsize=3,
                label=name,
                color=color,
            )
            for i, method in enumerate(("zero_shot", "head", "full")):
                values = [100 * r["test_accuracy"] for r in own if r["method"] == method]
                if values:
                    style = dict(color=f"C{i + 1}" if encoder is None else color, alpha=0.7)
                    label = method if encoder is None else f"{method} {encoder}"
                    ax.axhline(np.mean(values), linestyle="--", label=label, **style)
        ranks_sorted = sorted(ranks)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks_sorted, [str(r) for r in ranks_sorted])
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8 if len(encoders) == 1 else 6)
    fig.tight_layout()
    os.makedirs(os.path.join(run_dir, "plots"), exist_ok=True)
    path = os.path.join(run_dir, "plots", "accuracy_vs_rank.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
