"""Training loop: losses against hand formulas, SGD against a numpy loop, resume, determinism."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import checkpoint, losses, programs, train


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
            [np.asarray(programs.batch_indices(rng, epoch * 4 + s, 32, 8)) for s in range(4)]
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

    out = programs.make_predict(model_fn, 8)(params, {}, {"x": x, "labels": np.zeros(n, np.int32)})
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
    chunk = programs.make_train_chunk(linear_model_fn, opt, cfg)
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
    with pytest.raises(ValueError, match="has 4 examples, fewer than the batch size 8"):
        train.fit(linear_model_fn, state, {}, data, data, cfg, progress=False)


# -- any steps / eval_every (issue 15, item 2) ---------------------------------------------------


@pytest.mark.parametrize(
    "steps, eval_every, expected",
    [(20, 25, [20]), (10, 4, [4, 8, 10])],
)
def test_any_steps_and_eval_every_run_exactly_steps(steps, eval_every, expected):
    """``steps=20`` with the default ``eval_every=25`` used to be refused ("must divide")."""
    data = toy_data()
    cfg = train.TrainConfig(steps=steps, batch_size=8, learning_rate=0.05, eval_every=eval_every)
    state = train.init_state(zeros_params(), train.make_optimizer(cfg), cfg.seed)
    result = train.fit(linear_model_fn, state, {}, data, data, cfg, progress=False)
    assert int(result.state.step) == steps
    assert [r["step"] for r in result.history] == expected
    # The same steps as a run evaluated after every step: chunking never changes training.
    every = train.TrainConfig(steps=steps, batch_size=8, learning_rate=0.05, eval_every=1)
    state = train.init_state(zeros_params(), train.make_optimizer(every), every.seed)
    ref = train.fit(linear_model_fn, state, {}, data, data, every, progress=False)
    np.testing.assert_allclose(result.state.trainable["w"], ref.state.trainable["w"], rtol=1e-6)
    by_step = {r["step"]: r for r in ref.history}
    for r in result.history:
        assert r["dev_accuracy"] == by_step[r["step"]]["dev_accuracy"]


def _fit_stopped_after_first_save(cfg, model_fn, ckpt, monkeypatch, make_state):
    real_save = checkpoint.save

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.fit(model_fn, make_state(), {}, toy_data(), toy_data(), cfg, checkpoint_dir=ckpt,
                  progress=False)  # fmt: skip
    monkeypatch.setattr(checkpoint, "save", real_save)
    return train.fit(
        model_fn, make_state(), {}, toy_data(), toy_data(), cfg, checkpoint_dir=ckpt, progress=False
    )


def test_resume_is_exact_with_a_shorter_last_chunk(tmp_path, monkeypatch):
    cfg = train.TrainConfig(steps=11, batch_size=8, learning_rate=0.05, eval_every=4, seed=3)

    def fresh():
        return train.init_state(zeros_params(), train.make_optimizer(cfg), cfg.seed)

    full = train.fit(linear_model_fn, fresh(), {}, toy_data(), toy_data(), cfg, progress=False)
    resumed = _fit_stopped_after_first_save(
        cfg, linear_model_fn, tmp_path / "ck", monkeypatch, fresh
    )
    assert [r["step"] for r in resumed.history] == [4, 8, 11]
    assert resumed.history == full.history
    np.testing.assert_array_equal(resumed.state.trainable["w"], full.state.trainable["w"])


# -- dropout in the loop (issue 15, item 1) ------------------------------------------------------


def _dropout_probe():
    """A linear model with inverted dropout (rate 1/2) on its input; records each mask it draws."""
    masks = []

    def model_fn(trainable, frozen, batch, dropout_rng):
        x = batch["x"]
        if dropout_rng is not None:
            keep = jax.random.bernoulli(dropout_rng, 0.5, x.shape)
            jax.debug.callback(lambda m: masks.append(np.asarray(m)), keep, ordered=True)
            x = jnp.where(keep, x / 0.5, 0.0)
        return linear_model_fn(trainable, frozen, {**batch, "x": x}, None)

    return model_fn, masks


def test_fit_with_dropout_masks_differ_per_step_resume_exactly_and_stop_at_evaluation(
    tmp_path, monkeypatch
):
    cfg = train.TrainConfig(
        steps=6, batch_size=8, learning_rate=0.05, eval_every=3, train_dropout=True, seed=5
    )

    def fresh():
        return train.init_state(zeros_params(), train.make_optimizer(cfg), cfg.seed)

    model_fn, masks = _dropout_probe()
    full = train.fit(model_fn, fresh(), {}, toy_data(), toy_data(), cfg, progress=False)
    assert len(masks) == cfg.steps  # one mask per training step, none at evaluation
    assert all(np.isfinite(r["train_loss"]) for r in full.history)
    for i in range(cfg.steps):
        assert 0.2 < masks[i].mean() < 0.8
        for j in range(i):
            assert (masks[i] != masks[j]).any(), (i, j)
    # Dropout is on: training differs from the same run without it.
    plain_cfg = train.TrainConfig(steps=6, batch_size=8, learning_rate=0.05, eval_every=3, seed=5)
    plain = train.fit(
        linear_model_fn, fresh(), {}, toy_data(), toy_data(), plain_cfg, progress=False
    )
    assert not np.allclose(plain.state.trainable["w"], full.state.trainable["w"])
    # Off at evaluation: the recorded dev metrics are those of the deterministic model.
    dev = programs.evaluate(
        programs.make_predict(linear_model_fn, 64), full.state.trainable, {}, toy_data()
    )
    assert full.history[-1]["dev_accuracy"] == dev["accuracy"]
    np.testing.assert_allclose(full.history[-1]["dev_loss"], dev["loss"], rtol=1e-6)

    # Resumed after the first checkpoint: the same masks for the same steps, the same result.
    model_fn, masks_resumed = _dropout_probe()
    resumed = _fit_stopped_after_first_save(cfg, model_fn, tmp_path / "ck", monkeypatch, fresh)
    assert len(masks_resumed) == cfg.steps  # 3 before the stop, 3 after the resume
    for a, b in zip(masks_resumed, masks, strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.history == full.history
    np.testing.assert_array_equal(resumed.state.trainable["w"], full.state.trainable["w"])


def test_dropout_key_is_apart_from_the_batch_order_keys():
    rng = jax.random.key_data(jax.random.key(0))
    keys = {tuple(np.asarray(jax.random.key_data(programs.dropout_key(rng, t)))) for t in range(50)}
    assert len(keys) == 50
    batch_keys = {
        tuple(np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(rng), e))))
        for e in range(50)
    }
    assert not keys & batch_keys


def test_fit_with_encoder_and_lora_dropout(tiny_encoder_config):
    """A real encoder: its hidden/attention dropout and PEFT's lora_dropout, inside the loop
    (this raised OverflowError: the dropout key was fold_in(key, -1)). That the masks change
    per step, resume and stop at evaluation is checked above on a cheaper model."""
    import dataclasses

    from lora_jax import lora, models
    from lora_jax.readout import make_output_fn
    from lora_jax.trainable import Method, make_model_fn, split_params

    config = dataclasses.replace(
        tiny_encoder_config,
        num_hidden_layers=1,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    apply_fn, params = models.split(models.create(config, head="cls", num_labels=2))
    lcfg = lora.LoraConfig(r=2, alpha=4, targets="query|value", dropout=0.2)
    model_fn = make_model_fn(make_output_fn(apply_fn, "cls"), Method.LORA, lora_config=lcfg)
    rng = np.random.default_rng(0)
    data = {
        "input_ids": rng.integers(3, 50, size=(16, 6)).astype(np.int32),
        "attention_mask": np.ones((16, 6), np.int32),
        "labels": (np.arange(16) % 2).astype(np.int32),
    }
    cfg = train.TrainConfig(
        steps=2, batch_size=8, learning_rate=1e-2, eval_every=2, train_dropout=True
    )
    adapters, frozen = split_params(params, Method.LORA, key=jax.random.key(0), lora_config=lcfg)
    state = train.init_state(adapters, train.make_optimizer(cfg), cfg.seed)
    result = train.fit(model_fn, state, frozen, data, data, cfg, progress=False)
    assert int(result.state.step) == 2
    assert all(np.isfinite(r["train_loss"]) for r in result.history)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_losses_of_bfloat16_logits_are_computed_in_float32(loss):
    """The loss of bf16 logits equals the float64 closed form of the same (bf16-rounded) values
    to float32 rounding; a bf16 softmax / square would be off by about 1e-3 relative."""
    from lora_jax.losses import get_loss

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(8, 3)) * 4, jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 3, 8), jnp.int32)
    x, y = np.asarray(logits, np.float64), np.asarray(labels)
    if loss == "ce":
        z = x - x.max(-1, keepdims=True)
        want = np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(8), y])
    else:
        want = 0.5 * np.mean(np.sum((x - np.eye(3)[y]) ** 2, -1))
    got = get_loss(loss)(logits, labels)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
