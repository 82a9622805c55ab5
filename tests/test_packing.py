"""Packed (padding-free) training batches give what the padded batches give.

Oracles: a hand-packed batch; the padded forward pass (itself checked against PyTorch in
``test_models_golden.py``) row by row, in float64; training on padded batches (losses, best
step, adapters), for ``train.fit`` and a vectorized ``train.fit_job``; a Python loop over
``programs.batch_indices`` for the packed length.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sweep import _assert_same_fit as assert_same_fit

from lora_jax import lora, members, models, packing, programs, train
from lora_jax.capabilities import capabilities_of
from lora_jax.errors import ConfigError
from lora_jax.readout import make_output_fn
from lora_jax.trainable import Method, make_model_fn

V, T = 48, 9
WORDS = np.array([5, 9, 12])


def _encoder(model_type, dtype=jnp.float32, head=None):
    cfg = models.EncoderConfig(
        model_type=model_type,
        embedding_size=8 if model_type == "electra" else None,  # projected to the hidden 16
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=24,
        type_vocab_size=1 if model_type == "roberta" else 2,
        pad_token_id=1 if model_type == "roberta" else 0,
    )
    labels = len(WORDS) if head == "cls" else None
    return models.split(models.create(cfg, head=head, dtype=dtype, num_labels=labels)), cfg


def _rows(n, seed, pad_id, types=False):
    """n rows of T tokens, real tokens first (lengths 2..T), then padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, T + 1, n)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(3, V, (n, T)), pad_id).astype(np.int32)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "mask_pos": rng.integers(0, lengths).astype(np.int32),
        "labels": rng.integers(0, len(WORDS), n).astype(np.int32),
    }
    if types:
        batch["token_type_ids"] = (np.arange(T)[None] >= lengths[:, None] // 2) & (mask > 0)
        batch["token_type_ids"] = batch["token_type_ids"].astype(np.int32)
    return batch


def test_pack_lays_rows_end_to_end():
    batch = {
        "input_ids": np.array([[7, 8, 0, 0], [4, 5, 6, 3], [9, 2, 2, 0]]),
        "attention_mask": np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]),
        "mask_pos": np.array([1, 0, 2]),
        "labels": np.array([0, 1, 1]),
    }
    got = jax.tree.map(np.asarray, packing.pack(batch, 12))
    np.testing.assert_array_equal(got["input_ids"], [[7, 8, 4, 5, 6, 3, 9, 2, 2, 0, 0, 0]])
    np.testing.assert_array_equal(got["segment_ids"], [[1, 1, 2, 2, 2, 2, 3, 3, 3, 0, 0, 0]])
    np.testing.assert_array_equal(got["attention_mask"], [[1] * 9 + [0] * 3])
    np.testing.assert_array_equal(got["token_type_ids"], np.zeros((1, 12)))
    np.testing.assert_array_equal(got["row_starts"], [0, 2, 6])
    np.testing.assert_array_equal(got["token_index"], [[0, 1, 12, 12], [2, 3, 4, 5], [6, 7, 8, 12]])
    np.testing.assert_array_equal(got["mask_pos"], [1, 2, 8])
    np.testing.assert_array_equal(got["labels"], [0, 1, 1])
    np.testing.assert_array_equal(
        packing.segment_positions(got["segment_ids"]), [[0, 1, 0, 1, 2, 3, 0, 1, 2, 0, 1, 2]]
    )


@pytest.mark.parametrize(
    ("model_type", "head"), [("bert", "mlm"), ("roberta", None), ("electra", "mlm")]
)
def test_packed_forward_equals_each_padded_row(model_type, head):
    with jax.enable_x64():
        (apply_fn, params), cfg = _encoder(model_type, jnp.float64, head)
        batch = _rows(5, seed=3, pad_id=cfg.pad_token_id, types=model_type != "roberta")
        packed = packing.pack(batch, 48)
        inputs = ("input_ids", "attention_mask", "token_type_ids")
        pad_in = [batch.get(k) for k in inputs]
        pack_in = [packed[k] for k in inputs]
        seg = {k: packed[k] for k in ("segment_ids", "token_index")}
        if head == "mlm":  # at <mask>, the K label words: (B, K)
            kw = {"label_word_ids": WORDS}
            want = apply_fn(params, *pad_in, mask_positions=batch["mask_pos"], **kw)
            got = apply_fn(params, *pack_in, mask_positions=packed["mask_pos"], **kw, **seg)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        # All hidden states: each row's real tokens, in order.
        want = np.asarray(apply_fn(params, *pad_in))  # (B, T, H)
        got = np.asarray(apply_fn(params, *pack_in, **seg))[0]  # (P, H)
        lengths = batch["attention_mask"].sum(1)
        for b, start in enumerate(np.asarray(packed["row_starts"])):
            np.testing.assert_allclose(
                got[start : start + lengths[b]], want[b, : lengths[b]], rtol=1e-12, atol=1e-12
            )
        # The readouts that declare packed batches: the same (B, K).
        for readout in ("mlm",) if head == "mlm" else ("tied", "tied_mean"):
            output_fn = make_output_fn(apply_fn, readout, label_word_ids=WORDS)
            assert capabilities_of(output_fn).packs_rows
            np.testing.assert_allclose(
                output_fn(params, packed), output_fn(params, batch), rtol=1e-12, atol=1e-12
            )


def test_packed_length_is_the_largest_scheduled_batch():
    batch = _rows(13, seed=1, pad_id=0)
    rng = train.init_state({}, train.make_optimizer(train.TrainConfig()), seed=5).rng
    schedule = programs.batch_schedule(rng, 20, 13, 4)
    lengths = batch["attention_mask"].sum(1)
    most = 0
    for step in range(20):
        idx = np.asarray(programs.batch_indices(rng, jnp.int32(step), 13, 4))
        np.testing.assert_array_equal(schedule[step], idx)
        most = max(most, int(lengths[idx].sum()))
    assert packing.packed_length(batch["attention_mask"], schedule, multiple=1) == most
    assert packing.packed_length(batch["attention_mask"], schedule) == min(-(-most // 8) * 8, 4 * T)
    assert packing.packed_length(batch["attention_mask"], schedule, multiple=64) == 4 * T


def _lora_setup(model_type):
    (apply_fn, params), cfg = _encoder(model_type)
    output_fn = make_output_fn(apply_fn, "tied_mean", label_word_ids=WORDS)
    data = [_rows(12, seed=s, pad_id=cfg.pad_token_id) for s in (10, 11)]
    return output_fn, params, data


def _assert_same_fit(got, want):
    assert_same_fit(got, want, rtol=2e-5, param_rtol=1e-4)


TCFG = train.TrainConfig(steps=8, eval_every=4, batch_size=4, learning_rate=3e-2)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_packed_training_equals_padded_training(model_type):
    output_fn, params, (train_data, dev_data) = _lora_setup(model_type)
    config = lora.LoraConfig(r=2, alpha=4.0, targets="query|value")
    model_fn = make_model_fn(output_fn, Method.LORA, lora_config=config)
    adapters = lora.init(jax.random.key(0), params, config)

    def fit(pack):
        state = train.init_state(adapters, train.make_optimizer(TCFG), 7)
        length = programs.pack_length_needed(
            model_fn, state.rng, TCFG.steps, train_data, TCFG.batch_size
        )
        return train.fit(
            model_fn,
            state,
            params,
            train_data,
            dev_data,
            TCFG,
            progress=False,
            pack_length=length if pack else None,
        )

    got, want = fit(True), fit(False)
    assert len({h["train_loss"] for h in want.history}) == 2  # it trained
    _assert_same_fit(got, want)


def test_packed_sweep_equals_padded_sweep():
    output_fn, params, datas = _lora_setup("roberta")
    configs = [lora.LoraConfig(r=r, alpha=2.0 * r, targets="query|value") for r in (1, 2)]
    plan = lora.plan_stack(params, configs)
    fn = lora.with_member_factors(
        make_model_fn(output_fn, Method.LORA, lora_config=plan.config, fusion="fused")
    )
    assert capabilities_of(fn).packs_rows

    def fit(pack):
        state = train.init_states(
            lora.init_stack(params, plan, [3, 4]), TCFG, [TCFG.learning_rate] * 2, [3, 4]
        )
        length = max(
            programs.pack_length_needed(fn, state.rng[i], TCFG.steps, data, TCFG.batch_size)
            for i, data in enumerate(datas)
        )
        return train.fit_job(
            fn,
            state,
            params,
            datas,
            datas[::-1],
            TCFG,
            member_inputs=plan.factors,
            progress=False,
            pack_length=length if pack else None,
        )

    for got, want in zip(fit(True), fit(False), strict=True):
        _assert_same_fit(got, want)


def test_pack_refused_for_a_model_that_does_not_read_packed_rows():
    (apply_fn, params), _ = _encoder("bert", head="cls")
    cls_fn = make_model_fn(
        make_output_fn(apply_fn, "cls"), Method.FULL
    )  # the classification head reads [CLS]: no packed rows
    assert not capabilities_of(cls_fn).packs_rows
    data = {k: v for k, v in _rows(8, 0, 0).items() if k != "mask_pos"}
    state = train.init_state(params, train.make_optimizer(TCFG), 0)
    with pytest.raises(ConfigError, match="packs_rows"):
        train.fit(cls_fn, state, {}, data, data, TCFG, progress=False, pack_length=64)


def test_an_explicit_packed_length_too_short_for_a_batch_is_refused():
    output_fn, params, (train_data, dev_data) = _lora_setup("bert")
    config = lora.LoraConfig(r=1, alpha=2.0, targets="query|value")
    model_fn = make_model_fn(output_fn, Method.LORA, lora_config=config)
    state = train.init_state(
        lora.init(jax.random.key(0), params, config), train.make_optimizer(TCFG), 7
    )
    needed = programs.pack_length_needed(
        model_fn, state.rng, TCFG.steps, train_data, TCFG.batch_size
    )
    with pytest.raises(ConfigError, match=f"cannot hold this run's largest batch \\({needed}"):
        train.fit(
            model_fn,
            state,
            params,
            train_data,
            dev_data,
            TCFG,
            progress=False,
            pack_length=needed - 1,
        )


def test_block_length_holds_every_block_map_rows_cuts():
    mask = _rows(10, seed=4, pad_id=0)["attention_mask"]  # blocks of 4: 3 blocks of 4 rows
    lengths = mask.sum(1)
    padded = np.concatenate([lengths, [lengths[-1]] * 2])  # the last block repeats row 9
    most = padded.reshape(3, 4).sum(1).max()
    assert packing.block_length(mask, 4, multiple=1) == most
    stacked = np.stack([mask, np.ones_like(mask)])  # members: the longest of either
    assert packing.block_length(stacked, 4, multiple=1) == 4 * T


def test_packed_evaluation_equals_padded_evaluation():
    with jax.enable_x64():
        (apply_fn, params), cfg = _encoder("roberta", jnp.float64)
        output_fn = make_output_fn(apply_fn, "tied_mean", label_word_ids=WORDS)
        config = lora.LoraConfig(r=2, alpha=4.0, targets="query|value")
        model_fn = make_model_fn(output_fn, Method.LORA, lora_config=config)
        adapters = jax.tree.map(  # nonzero B, so the adapters change the outputs
            lambda x: x + 0.1, lora.init(jax.random.key(1), params, config)
        )
        data = _rows(11, seed=6, pad_id=cfg.pad_token_id)
        predict = programs.make_predict(model_fn, 4, by_length=True)
        want = predict(adapters, params, data)
        with pytest.raises(ConfigError, match="packed length in tokens"):
            programs.make_predict(model_fn, 4)(adapters, params, data, pack_length=True)
        np.testing.assert_allclose(
            predict(adapters, params, data, packed=True), want, rtol=1e-12, atol=1e-12
        )

        plan = lora.plan_stack(params, [config, config])
        stacked = members.stack([adapters, jax.tree.map(lambda x: -x, adapters)])
        assert plan.factors is None  # two members of one config: nothing to pad
        vpredict = programs.job_programs(
            make_model_fn(output_fn, Method.LORA, lora_config=plan.config, fusion="fused"),
            train.TrainConfig(eval_batch_size=4),
        ).predict
        np.testing.assert_allclose(
            vpredict(stacked, params, data, packed=True),
            vpredict(stacked, params, data),
            rtol=1e-12,
            atol=1e-12,
        )
        np.testing.assert_allclose(
            vpredict(stacked, params, data, packed=True)[0], want, rtol=1e-10
        )


def test_pack_refused_on_a_mesh():
    output_fn, params, (train_data, dev_data) = _lora_setup("bert")
    config = lora.LoraConfig(r=1, alpha=2.0, targets="query|value")
    model_fn = make_model_fn(output_fn, Method.LORA, lora_config=config)
    adapters = lora.init(jax.random.key(0), params, config)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    state = train.init_state(adapters, train.make_optimizer(TCFG), 7)
    with pytest.raises(ConfigError, match="one device"):
        train.fit(model_fn, state, params, train_data, dev_data, TCFG, mesh=mesh, pack_length=64)
    configs = [config, lora.LoraConfig(r=2, alpha=4.0, targets="query|value")]
    plan = lora.plan_stack(params, configs)
    fn = lora.with_member_factors(
        make_model_fn(output_fn, Method.LORA, lora_config=plan.config, fusion="fused")
    )
    states = train.init_states(lora.init_stack(params, plan, [3, 4]), TCFG, [0.1] * 2, [3, 4])
    with pytest.raises(ConfigError, match="one device"):
        train.fit_job(
            fn,
            states,
            params,
            [train_data] * 2,
            [dev_data] * 2,
            TCFG,
            member_inputs=plan.factors,
            mesh=mesh,
            progress=False,
            pack_length=64,
        )
