"""A run prints what its user needs: no transformers "PyTorch was not found" banner (torch is
not a dependency by design) and no warning about the classifier the head-only baseline creates
on purpose; warnings that matter still come through."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from experiments.workbench import _NewHeadFilter
from lora_jax import models
from lora_jax.testing import make_tiny_checkpoint

BANNER = "PyTorch was not found"
NEW_HEAD = "Newly initialized"


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "roberta"))


def test_a_run_prints_neither_the_torch_banner_nor_the_new_classifier(tiny_roberta, tmp_path):
    """A fresh process (transformers prints its banner once, on import) running a head-only
    and a zero-shot cell."""
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    argv = [
        sys.executable, "-m", "experiments.run", "--model", tiny_roberta, "--out", str(tmp_path),
        "--name", "quiet", "--tasks", "mr", "--methods", "zero_shot", "head", "--seeds", "13",
        "--k", "4", "--steps", "2", "--eval-every", "2", "--max-length", "32", "--test-cap", "8",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert BANNER not in done.stderr, done.stderr
    assert NEW_HEAD not in done.stderr, done.stderr
    assert "report:" in done.stderr  # what the user needs is still there


def test_other_warnings_still_come_through(tiny_roberta, caplog):
    # Outside the baseline, a new classifier is reported, as transformers does.
    with caplog.at_level(logging.WARNING, logger="lora_jax.models.pretrained"):
        models.from_pretrained(tiny_roberta, head="cls", num_labels=2)
    assert any(NEW_HEAD in r.getMessage() for r in caplog.records)
    # The baseline's filter drops only a record whose new weights are all the head's.
    quiet = _NewHeadFilter()

    def passes(*new):
        record = logging.LogRecord("x", logging.WARNING, "", 0, NEW_HEAD, (), None)
        record.newly_initialized = new
        return quiet.filter(record)

    assert not passes("classifier.kernel", "classifier.bias")
    assert not passes("classifier.kernel", "pooler.dense.kernel")  # DeBERTa's ContextPooler
    assert passes("classifier.kernel", "bert.pooler.dense.kernel")  # an encoder weight: kept
    # transformers' other messages pass its logger's filters; only the banner is dropped.
    transformers_log = logging.getLogger("transformers")
    record = logging.LogRecord("transformers", logging.WARNING, "", 0, "%s", ("x",), None)
    assert all(f.filter(record) for f in transformers_log.filters)
    record.msg = BANNER + ". Models won't be available ..."
    assert not all(f.filter(record) for f in transformers_log.filters)
