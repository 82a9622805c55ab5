"""lora_jax.train.fit_job: a vectorized job of LoRA members equals the members trained one at a
time.

The oracle is ``train.fit`` on each member alone, with its own unpadded LoraConfig, learning
rate, seed and data (fused LoRA, fp32).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora, members, programs, train
from lora_jax.models import create, split
from lora_jax.readout import make_output_fn
from lora_jax.trainable import Method, make_model_fn

T, N_TRAIN, N_DEV = 8, 12, 8


@pytest.fixture(scope="module")
def tiny(tiny_encoder_config):
    one_layer = dataclasses.replace(tiny_encoder_config, num_hidden_layers=1)  # compiles faster
    apply_fn, params = split(create(one_layer, head="cls", num_labels=2, seed=0))
    return make_output_fn(apply_fn, "cls"), params


def _data(seed, n, vocab=50):
    rng = np.random.default_rng(seed)
    return {
        "input_ids": jnp.asarray(rng.integers(5, vocab, (n, T)), jnp.int32),
        "attention_mask": jnp.ones((n, T), jnp.int32),
        "labels": jnp.asarray(rng.integers(0, 2, n), jnp.int32),
    }


# Members differ in rank, scale (alpha), learning rate, seed and data.
MEMBERS = [
    dict(cfg=lora.LoraConfig(r=1, alpha=2.0, targets="query|value"), lr=3e-2, seed=13),
    dict(cfg=lora.LoraConfig(r=4, alpha=8.0, targets="query|value"), lr=1e-2, seed=21),
    dict(cfg=lora.LoraConfig(r=2, alpha=1.0, targets="query|value"), lr=5e-2, seed=42),
]


def _run_both(tiny, tcfg, job, model_fn_for=None):
    """(vectorized results, sweep plan, sequential results) for ``job``."""
    output_fn, params = tiny
    if model_fn_for is None:

        def model_fn_for(cfg):
            return make_model_fn(output_fn, Method.LORA, lora_config=cfg, fusion="fused")

    trains = [_data(100 + i, N_TRAIN) for i in range(len(job))]
    devs = [_data(200 + i, N_DEV) for i in range(len(job))]
    plan = lora.plan_stack(params, [m["cfg"] for m in job])
    seeds = [m["seed"] for m in job]
    state = train.init_states(
        lora.init_stack(params, plan, seeds), tcfg, [m["lr"] for m in job], seeds
    )
    vec = train.fit_job(
        lora.with_member_factors(model_fn_for(plan.config)),
        state,
        params,
        trains,
        devs,
        tcfg,
        member_inputs=plan.factors,
        progress=False,
    )
    seq = []
    for m, tr, dv in zip(job, trains, devs, strict=True):
        cfg = train.TrainConfig(**{**tcfg.__dict__, "learning_rate": m["lr"], "seed": m["seed"]})
        adapters = lora.init(jax.random.key(m["seed"]), params, m["cfg"])
        st = train.init_state(adapters, train.make_optimizer(cfg), cfg.seed)
        seq.append(train.fit(model_fn_for(m["cfg"]), st, params, tr, dv, cfg, progress=False))
    return vec, plan, seq


def _assert_same(vec, plan, seq, rtol=2e-5, atol=2e-6):
    for i, (v, s) in enumerate(zip(vec, seq, strict=True)):
        for hv, hs in zip(v.history, s.history, strict=True):
            assert hv["step"] == hs["step"]
            np.testing.assert_allclose(hv["train_loss"], hs["train_loss"], rtol=rtol)
            np.testing.assert_allclose(hv["dev_loss"], hs["dev_loss"], rtol=rtol)
            assert hv["dev_accuracy"] == hs["dev_accuracy"]
        assert v.best_step == s.best_step and v.best_dev_accuracy == s.best_dev_accuracy
        for got, want in [
            (v.state.trainable, s.state.trainable),
            (v.best_trainable, s.best_trainable),
        ]:
            jax.tree.map(
                lambda g, w: np.testing.assert_allclose(g, w, rtol=rtol, atol=atol),
                lora.unpad(plan, got, i),
                want,
            )


def _assert_same_fit(got, want, *, rtol, param_rtol, atol=1e-6):
    """Two ``train.fit`` results: losses, dev accuracies, best step and best parameters."""
    for g, w in zip(got.history, want.history, strict=True):
        np.testing.assert_allclose(
            [g["train_loss"], g["dev_loss"]], [w["train_loss"], w["dev_loss"]], rtol=rtol
        )
        assert g["dev_accuracy"] == w["dev_accuracy"]
    assert got.best_step == want.best_step
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=param_rtol, atol=atol),
        got.best_trainable,
        want.best_trainable,
    )


def _assert_padding_stayed_zero(results, job, r_pad):
    for res, m in zip(results, job, strict=True):
        for leaves in res.state.trainable.values():
            a, b = np.asarray(leaves["lora_a"]), np.asarray(leaves["lora_b"])
            assert a.shape[1] == b.shape[0] == r_pad
            assert not np.any(a[:, m["cfg"].r :]) and not np.any(b[m["cfg"].r :])
            assert np.any(b[: m["cfg"].r])  # the real rows did train


def test_vectorized_members_equal_members_trained_one_at_a_time(tiny):
    # AdamW with weight decay; r = 1, 4, 2 padded to 4.
    tcfg = train.TrainConfig(
        steps=6, eval_every=2, batch_size=4, eval_batch_size=8, weight_decay=0.1
    )
    vec, plan, seq = _run_both(tiny, tcfg, MEMBERS)
    assert len({h["dev_accuracy"] for r in seq for h in r.history}) > 1  # selection matters
    _assert_same(vec, plan, seq)
    _assert_padding_stayed_zero(vec, MEMBERS, 4)


def test_per_member_clipping_and_sgd_equal_sequential(tiny):
    # max_grad_norm far below every gradient norm: each member's update is clipped by its own
    # norm. A global norm over the stacked members would scale both updates differently.
    tcfg = train.TrainConfig(
        steps=4,
        eval_every=2,
        batch_size=4,
        eval_batch_size=8,
        optimizer="sgd",
        momentum=0.9,
        max_grad_norm=1e-4,
    )
    job = [dict(MEMBERS[0], lr=50.0), dict(MEMBERS[1], lr=20.0)]
    vec, plan, seq = _run_both(tiny, tcfg, job)
    _assert_same(vec, plan, seq)
    _assert_padding_stayed_zero(vec, job, 4)


def test_linearized_lora_members_equal_sequential(tiny):
    import ntk

    output_fn, _ = tiny
    tcfg = train.TrainConfig(steps=4, eval_every=2, batch_size=4, eval_batch_size=8)
    vec, plan, seq = _run_both(
        tiny, tcfg, MEMBERS[:2], lambda cfg: ntk.lora_linearized_model_fn(output_fn, cfg)
    )
    _assert_same(vec, plan, seq)


def test_base_gemms_run_once_for_all_members(tiny):
    """In the compiled vectorized step the base GEMMs take all members' rows at once.

    With the frozen base unbatched, a base kernel's forward dot has n * B * T = 96 rows and no
    batch dimension, and no dot makes a per-member (n, in, out) kernel-shaped array. The merged
    path (n kernels W + s A_i B_i, each with its own weight gradient) does: the check sees it.
    """
    output_fn, params = tiny
    n = 3
    plan = lora.plan_stack(params, [m["cfg"] for m in MEMBERS])
    tcfg = train.TrainConfig(steps=2, eval_every=2, batch_size=4)
    state = train.init_states(lora.init_stack(params, plan, [0, 1, 2]), tcfg, [1e-3] * n, [0, 1, 2])
    data = members.stack([_data(i, N_TRAIN) for i in range(n)])

    def dot_shapes(fusion):
        model_fn = make_model_fn(output_fn, Method.LORA, lora_config=plan.config, fusion=fusion)
        chunk = programs.job_programs(
            lora.with_member_factors(model_fn), tcfg, member_inputs=True
        ).chunk
        lowered = chunk.lower(state, (params, plan.factors), data, length=2, shared=False)
        hlo = lowered.compile().as_text()
        shapes = re.findall(r"= (f32\[[\d,]*\])\{[\d,]*\} dot\(", hlo)
        assert shapes, "no dots found in the compiled HLO; the regex no longer matches"
        return shapes

    per_member_kernels = {"f32[3,16,16]", "f32[3,16,24]", "f32[3,24,16]"}
    fused = dot_shapes(fusion="fused")
    assert not per_member_kernels & set(fused)
    assert any(s.startswith("f32[96,") for s in fused)  # (n B T, out): members in the rows
    assert per_member_kernels & set(dot_shapes(fusion="merged"))


def test_member_data_smaller_than_batch_is_a_clear_error(tiny):
    output_fn, params = tiny
    plan = lora.plan_stack(params, [m["cfg"] for m in MEMBERS[:2]])
    tcfg = train.TrainConfig(steps=2, eval_every=2, batch_size=4)
    state = train.init_states(lora.init_stack(params, plan, [0, 1]), tcfg, [1e-3] * 2, [0, 1])
    model_fn = lora.with_member_factors(
        make_model_fn(output_fn, Method.LORA, lora_config=plan.config, fusion="fused")
    )
    dev = [_data(0, N_DEV)] * 2
    with pytest.raises(
        ValueError, match="member 1: the training set has 3 examples, fewer than the batch size 4"
    ):
        train.fit_job(
            model_fn,
            state,
            params,
            [_data(0, N_TRAIN), _data(1, 3)],
            dev,
            tcfg,
            member_inputs=plan.factors,
            progress=False,
        )
    with pytest.raises(ValueError, match="training sets of member 0 and member 1 differ in shape"):
        train.fit_job(
            model_fn,
            state,
            params,
            [_data(0, N_TRAIN), _data(1, 6)],
            dev,
            tcfg,
            member_inputs=plan.factors,
            progress=False,
        )
    with pytest.raises(ValueError, match="member 1 differs from member 0 in .'targets'."):
        lora.plan_stack(params, [MEMBERS[0]["cfg"], lora.LoraConfig(r=2, targets="query")])


def test_members_along_an_adapter_mesh_axis_equal_one_device():
    """16 members split over a data=8 mesh (simulated CPU devices, two per device), and 5 over
    data=4 (padded with 3 idle members), train as on one device."""
    import json
    import os
    import subprocess
    import sys

    from _env import simulated_devices

    env = simulated_devices(8)
    script = os.path.join(os.path.dirname(__file__), "_sweep_mesh_run.py")
    proc = subprocess.run(
        [sys.executable, script], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["spec"].startswith("PartitionSpec('data'") and out["chunk_devices"] == 8
    # No collective moves a member's adapters or gradients: each member trains on its device.
    # What crosses members is scalars: the 16 x 2 losses (128 bytes) and the like.
    assert out["collectives"], "the HLO parser found no collective: it is broken"
    assert max(size for _, size in out["collectives"]) <= 16 * 2 * 4, out["collectives"]
    for name, k in (("mesh", 16), ("padded", 5)):
        one = {key: value[:k] for key, value in out["one"].items() if key != "devices"}
        assert len(out[name]["losses"]) == k  # the idle members are dropped
        assert out[name]["best_step"] == one["best_step"]
        assert out[name]["test"] == one["test"]
        np.testing.assert_allclose(out[name]["losses"], one["losses"], rtol=1e-5)
        np.testing.assert_allclose(out[name]["b"], one["b"], rtol=1e-4, atol=1e-6)
