"""Head-only features pooled as the checkpoint was trained (issue 15, item 8)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lora_jax import models
from lora_jax.errors import ConfigError
from lora_jax.pooling import (
    Pooling,
    PoolingSpec,
    detect_pooling,
    make_pooled_feature_fns,
    mean_pool,
)
from lora_jax.testing import make_tiny_checkpoint


def sentence_transformers_dir(path, mode="pooling_mode_mean_tokens", normalize=True):
    """Adds the files sentence-transformers writes next to a HF model (modules.json, Pooling)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    modes = dict.fromkeys(
        ["pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens"], False
    )
    (path / "1_Pooling" / "config.json").write_text(json.dumps({**modes, mode: True}))
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("pool") / "bert", model_type="bert")


def test_detects_the_pooling_each_checkpoint_was_trained_with(tiny_bert, tmp_path):
    # The embedded MiniLM is a sentence-transformers model: normalized mean pooling.
    assert detect_pooling(models.minilm_path()) == PoolingSpec(Pooling.MEAN, True)
    assert detect_pooling(tiny_bert) == PoolingSpec(Pooling.POOLER)  # plain HF checkpoint
    cls_dir = tmp_path / "cls"
    cls_dir.mkdir()
    sentence_transformers_dir(cls_dir, "pooling_mode_cls_token", normalize=False)
    assert detect_pooling(cls_dir) == PoolingSpec(Pooling.CLS, False)
    max_dir = tmp_path / "max"
    max_dir.mkdir()
    sentence_transformers_dir(max_dir, "pooling_mode_max_tokens")
    with pytest.raises(ConfigError, match="pooling_mode_max_tokens.*--pooling"):
        detect_pooling(max_dir)


def test_mean_pool_ignores_padding():
    states = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.int32)
    want = np.stack([states[0, :3].mean(0), states[1, 0]])
    np.testing.assert_allclose(mean_pool(states, mask), want, rtol=1e-6)


def test_mean_features_and_a_linear_head_without_the_pooler(tiny_bert):
    model = models.from_pretrained(tiny_bert, head="cls", num_labels=3, seed=2)
    _, params = models.split(model)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, size=(3, 9)).astype(np.int32)
    mask = np.ones((3, 9), np.int32)
    mask[1, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    states = np.asarray(models.forward(params, ids, mask, config=model.config, head=None))
    feature_fn, head_fn = make_pooled_feature_fns(model.config, PoolingSpec(Pooling.MEAN, True))
    features = np.asarray(feature_fn(params, batch))
    mean = np.stack([states[i, mask[i] > 0].mean(0) for i in range(3)])
    np.testing.assert_allclose(
        features, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5
    )
    logits = head_fn(params, {"features": features})
    c = params["classifier"]
    np.testing.assert_allclose(logits, features @ c["kernel"] + c["bias"], atol=1e-5)
    # The (untrained) pooler plays no part.
    changed = jax.tree.map(lambda x: x, params)
    changed["bert"]["pooler"]["dense"]["kernel"] = changed["bert"]["pooler"]["dense"]["kernel"] * 3
    np.testing.assert_allclose(head_fn(changed, {"features": features}), logits, atol=1e-6)
    # CLS: the [CLS] state itself.
    feature_fn, _ = make_pooled_feature_fns(model.config, "cls")
    np.testing.assert_allclose(feature_fn(params, batch), states[:, 0], atol=1e-5)


def test_head_only_baseline_reads_mean_pooled_features_of_a_sentence_embedding_model(
    tiny_bert, tmp_path
):
    """The experiment's head cells used BERT's [CLS] + pooler whatever the checkpoint."""
    import shutil

    from experiments.config import ExperimentConfig
    from experiments.workbench import Workbench

    path = tmp_path / "st"
    shutil.copytree(tiny_bert, path)
    sentence_transformers_dir(path)
    cfg = ExperimentConfig(model=str(path), tasks=("mr",), k=2, max_length=24, test_cap=4)
    bench = Workbench(cfg)
    assert bench.pooling == PoolingSpec(Pooling.MEAN, True)
    _, params, data = bench.cls_head_model("mr", 13)
    raw = bench.data("mr", 13, mode="cls").train
    model = models.from_pretrained(path, head=None)
    states = np.asarray(
        models.forward(
            params, raw["input_ids"], raw["attention_mask"], config=model.config, head=None
        )
    )
    m = np.asarray(raw["attention_mask"])
    mean = np.stack([states[i, m[i] > 0].mean(0) for i in range(len(m))])
    want = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(data.train["features"], want, atol=1e-5)
    explicit = Workbench(ExperimentConfig(model=str(path), pooling="pooler"))
    assert explicit.pooling == PoolingSpec(Pooling.POOLER)
