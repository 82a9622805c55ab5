"""Training loop: losses against hand formulas, SGD against a numpy loop, resume, determinism."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import checkpoint, losses, train


def linear_model_fn(trainable, frozen, batch, dropout_rng):
    del frozen, dropout_rng
    return batch["x"] @ trainable["w"] + trainable["b"]


def toy_data(n=32, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    labels = np.arange(n) % k
    x = centers[labels] + rng.normal(size=(n, d))
    return {"x": x.astype(np.float32), "labels": labels.astype(np.int32)}


def zeros_params(d=5, k=3):
    return {"w": jnp.zeros((d, k)), "b": jnp.zeros((k,))}


def test_losses_match_hand_formulas():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=6)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected_ce = -log_softmax[np.arange(6), labels].mean()
    onehot = np.eye(4)[labels]
    expected_mse = (0.5 * ((logits - onehot) ** 2).sum(-1)).mean()
    np.testing.assert_allclose(losses.cross_entropy(logits, labels), expected_ce, rtol=1e-5)
    np.testing.assert_allclose(losses.squared_error(logits, labels), expected_mse, rtol=1e-5)
    with pytest.raises(ValueError, match="Unknown loss 'hinge'"):
        losses.get_loss("hinge")


def test_batch_indices_cover_each_epoch_once():
    rng = jax.random.key_data(jax.random.key(3))
    for epoch in range(3):
        seen = np.concatenate(
            [np.asarray(train.batch_indices(rng, epoch * 4 + s, 32, 8)) for s in range(4)]
        )
        assert sorted(seen.tolist()) == list(range(32))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 32, 33])
def test_predict_covers_every_row_in_even_batches(n):
    rng = np.random.default_rng(n)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3))), "b": jnp.asarray(rng.normal(size=3))}
    x = rng.normal(size=(n, 5)).astype(np.float32)
    shapes = []

    def model_fn(trainable, frozen, batch, dropout_rng):
        shapes.append(batch["x"].shape)  # recorded at trace time
        return linear_model_fn(trainable, frozen, batch, dropout_rng)

    out = train.make_predict(model_fn, 8)(params, {}, {"x": x, "labels": np.zeros(n, np.int32)})
    np.testing.assert_allclose(out, x @ params["w"] + params["b"], rtol=1e-5, atol=1e-5)
    batches = -(-n // 8)
    assert shapes[-1] == (-(-n // batches), 5)  # e.g. 9 rows: 2 batches of 5, not 2 of 8


def test_full_batch_sgd_matches_numpy_gradient_descent():
    data = toy_data()
    cfg = train.TrainConfig(
        steps=20,
        batch_size=32,
        learning_rate=0.05,
        optimizer="sgd",
        loss="mse",
        max_grad_norm=None,
        eval_every=10,
    )
    state = train.init_state(zeros_params(), train.make_optimizer(cfg), cfg.seed)
    result = train.fit(linear_model_fn, state, {}, data, data, cfg, progress=False)

    # Oracle: explicit gradient of 0.5 * mean ||x w + b - y||^2 by hand.
    x, y = data["x"].astype(np.float64), np.eye(3)[data["labels"]]
    w, b = np.zeros((5, 3)), np.zeros(3)
    for _ in range(20):
        r = (x @ w + b - y) / len(x)
        w, b = w - 0.05 * x.T @ r, b - 0.05 * r.sum(0)
    np.testing.assert_allclose(result.state.trainable["w"], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.state.trainable["b"], b, rtol=1e-4, atol=1e-5)


def test_fit_learns_and_keeps_best_dev_and_writes_metrics(tmp_path):
    data = toy_data()
    cfg = train.TrainConfig(steps=60, batch_size=8, learning_rate=0.1, eval_every=20)
    state = train.init_state(zeros_params(), train.make_optimizer(cfg), cfg.seed)
    metrics = tmp_path / "metrics.jsonl"
    result = train.fit(
        linear_model_fn, state, {}, data, data, cfg, metrics_path=metrics, progress=False
    )
    assert result.best_dev_accuracy == 1.0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 40, 60]
    assert result.best_step == min(r["step"] for r in records if r["dev_accuracy"] == 1.0)
    # The caller's initial state is not donated away.
    assert float(jnp.abs(state.trainable["w"]).sum()) == 0.0


def test_resume_after_stop_gives_same_result(tmp_path, monkeypatch):
    data = toy_data()
    cfg = train.TrainConfig(steps=40, batch_size=8, learning_rate=0.05, eval_every=10, seed=7)

    def fresh():
        return train.init_state(zeros_params(), train.make_optimizer(cfg), cfg.seed)

    full = train.fit(linear_model_fn, fresh(), {}, data, data, cfg, progress=False)

    real_save, saves = checkpoint.save, []

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.fit(
            linear_model_fn,
            fresh(),
            {},
            data,
            data,
            cfg,
            checkpoint_dir=tmp_path / "ck",
            progress=False,
        )
    monkeypatch.setattr(checkpoint, "save", real_save)
    resumed = train.fit(
        linear_model_fn,
        fresh(),
        {},
        data,
        data,
        cfg,
        checkpoint_dir=tmp_path / "ck",
        progress=False,
    )

    assert resumed.history == full.history
    np.testing.assert_array_equal(resumed.state.trainable["w"], full.state.trainable["w"])
    np.testing.assert_array_equal(resumed.best_trainable["w"], full.best_trainable["w"])


def test_grad_accumulation_updates_every_k_steps():
    data = jax.tree.map(jnp.asarray, toy_data())
    cfg = train.TrainConfig(steps=6, batch_size=8, grad_accum=4, eval_every=3, learning_rate=0.1)
    opt = train.make_optimizer(cfg)
    chunk = train.make_train_chunk(linear_model_fn, opt, cfg)
    state, _ = chunk(train.init_state(zeros_params(), opt, cfg.seed), {}, data)
    assert float(jnp.abs(state.trainable["w"]).sum()) == 0.0  # 3 micro-steps: no update yet
    state, _ = chunk(state, {}, data)
    assert float(jnp.abs(state.trainable["w"]).sum()) > 0.0  # the 4th micro-step updated
    assert int(state.step) == 6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"optimizer": "adam"}, "optimizer='adam' is not one of"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train.TrainConfig(**kwargs)


def test_batch_larger_than_training_set_is_a_clear_error():
    data = toy_data(n=4)
    cfg = train.TrainConfig(steps=10, batch_size=8, eval_every=10)
    state = train.init_state(zeros_params(), train.make_optimizer(cfg), cfg.seed)
    with pytest.raises(ValueError, match="fewer than batch_size=8"):
        train.fit(linear_model_fn, state, {}, data, data, cfg, progress=False)
