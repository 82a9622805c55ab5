"""experiments.cstar / pl / bias_variance / paper_claims entry points, on tiny sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import bias_variance, cstar, paper_claims, pl
from lora_jax.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "roberta"))


def test_cstar_cli_writes_report_and_resumes(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--shapes", "4x3x1", "--solvers", "lm", "--draws", "4"]
    args += ["--rhos", "0.8", "1.5", "--tols", "1e-4", "--tol", "1e-4"]
    cstar.main(args)
    out = capsys.readouterr().out
    assert "| 4x3x1 | 6 | 1.500 | lm | 300 |" in out
    points = (tmp_path / "cstar" / "points.jsonl").read_text().splitlines()
    assert len(points) == 2 and (tmp_path / "cstar" / "plots" / "cstar.png").exists()
    cstar.main(args)  # resumes: nothing recomputed
    assert len((tmp_path / "cstar" / "points.jsonl").read_text().splitlines()) == 2
    with pytest.raises(SystemExit):
        cstar.main(["--shapes", "4x3x9"])


@pytest.mark.slow
def test_pl_and_bias_variance_run_on_a_tiny_model(tiny_roberta, tmp_path):
    common = {"model": tiny_roberta, "k": 2, "max_length": 16, "out": str(tmp_path)}
    res = pl.run(pl.PLConfig(task="mr", steps=5, layers=(), **common))
    for name in ("ce", "mse"):
        assert len(res[name]["loss"]) == 6 and res[name]["loss_end"] < res[name]["loss_start"]
    assert "| ce |" in pl.markdown(res)
    out = bias_variance.run(
        bias_variance.BiasVarianceConfig(
            tasks=("mr",), ranks=(1, 2), steps=3, draws=4, layers=(), **common
        )
    )
    (task,) = out["tasks"]
    assert task["best_rank"] in (1, 2) and len(task["fit"]) == 2
    assert np.all(np.diff(task["complexity"]) >= 0)  # the Ky Fan norm grows with r
    saved = json.loads((tmp_path / "bias_variance" / "bias_variance.json").read_text())
    assert saved["tasks"][0]["ranks"] == [1, 2]


def test_paired_t_and_its_verdict_inputs():
    diff, t, n = paper_claims.paired_t([0.80, 0.82, 0.79], [0.78, 0.81, 0.80])
    assert n == 3 and diff == pytest.approx(100 * (0.02 + 0.01 - 0.01) / 3)
    d = np.array([2.0, 1.0, -1.0])
    assert t == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(3)))
