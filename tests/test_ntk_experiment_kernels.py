"""``--ntk-kernel``: which kernels the experiments' NTK analysis predicts with, and its report."""

import numpy as np
import pytest
import scipy.stats

import ntk
from experiments import report
from experiments.config import ExperimentConfig, KernelChoice
from experiments.ntk_analysis import in_blocks_that_fit, kernels_for
from experiments.run import parse_args
from lora_jax.errors import ConfigError
from lora_jax.optim import Optimizer


def test_kernel_choice_maps_optimizers_to_kernels():
    sgd, asgn = ntk.Kernel.SGD, ntk.Kernel.ASIGNGD
    assert kernels_for("matched", Optimizer.ADAMW) == [sgd, asgn]
    assert kernels_for("matched", Optimizer.SGD) == [sgd]
    assert kernels_for("both", Optimizer.SGD) == [sgd, asgn]
    assert kernels_for("asigngd", Optimizer.SGD) == [asgn]
    cfg = ExperimentConfig(ntk=True, ntk_kernel="both")
    assert cfg.ntk_kernel == KernelChoice.BOTH and cfg.to_json()["ntk_kernel"] == "both"
    assert "ntk_kernel" not in ExperimentConfig().to_json()  # runs without --ntk: as before
    with pytest.raises(ConfigError, match="ntk_kernel='adam' is not a KernelChoice"):
        ExperimentConfig(ntk_kernel="adam")
    assert parse_args(["--ntk", "--ntk-kernel", "asigngd"]).ntk_kernel == KernelChoice.ASIGNGD


def _records():
    rng = np.random.default_rng(0)
    out = []
    for seed in (13, 21, 42):
        ft = 0.8 + 0.01 * rng.normal()
        out.append(
            {
                "task": "trec",
                "rank": 4,
                "seed": seed,
                "ntk_acc_trained": ft,
                "ntk_acc_linearized_trained": ft - 0.1,
                "ntk_acc_kernel": ft - 0.2 + 0.01 * rng.normal(),
                "ntk_acc_kernel_asigngd": ft - 0.05 + 0.01 * rng.normal(),
            }
        )
    return out


def test_gap_table_has_a_paired_column_per_kernel():
    records = _records()
    table = report.ntk_gap_table(records)
    assert "FT − SGD kernel (95% CI)" in table and "FT − A-SignGD kernel (95% CI)" in table
    gaps = np.array([r["ntk_acc_trained"] - r["ntk_acc_kernel_asigngd"] for r in records])
    mean = gaps.mean()
    half = scipy.stats.t.ppf(0.975, 2) * gaps.std(ddof=1) / np.sqrt(3)
    row = table.splitlines()[-1]
    assert f"{100 * mean:+.1f}" in row and f"{100 * half:.1f}" in row
    # Records of the SGD kernel alone: the table as before.
    old = [{k: v for k, v in r.items() if not k.endswith("asigngd")} for r in records]
    assert "FT − kernel (95% CI)" in report.ntk_gap_table(old)
    assert "A-SignGD" not in report.ntk_gap_table(old) + report.ntk_table(old)


# The end-to-end AdamW --ntk cell with both kernels is tests/test_experiments.py's NTK test.


def test_kernel_blocks_are_halved_while_they_do_not_fit(capsys):
    """A block refused for memory (free memory moves with the machine's load) is retried at
    half its rows, down to 8; the error stands when the smallest block does not fit."""
    seen = []

    def compute(sizes):
        seen.append(sizes)
        if sizes[0] > 32:
            raise ntk.KernelMemoryError(f"One {sizes} block needs more than is available.")
        return "kernel"

    assert in_blocks_that_fit(compute, (128, 64)) == "kernel"
    assert seen == [(128, 64), (64, 32), (32, 16)]
    err = capsys.readouterr().err
    assert "(128, 64) block needs" in err and "Retrying with kernel blocks of (64, 32) rows" in err

    def never(sizes):
        seen.append(sizes)
        raise ntk.KernelMemoryError("too big")

    seen.clear()
    with pytest.raises(ntk.KernelMemoryError, match="too big"):
        in_blocks_that_fit(never, (16, 8))
    assert seen == [(16, 8), (8, 8)]
