"""lora_jax.lora core: targeting, init, apply/merge/unmerge, grads, masks, counts, errors.

Oracles are hand-written numpy (W + s * A @ B), PEFT's documented rules (targeting, pattern
matching, init distributions) and the real model through both the merged and the fused path.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora, models
from lora_jax.errors import ConfigError


def _linear(rng, n_in, n_out):
    return {
        "kernel": jnp.asarray(rng.normal(size=(n_in, n_out)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(n_out,)), jnp.float32),
    }


def toy_params(seed=0, hidden=8, inter=12, layers=3, labels=3):
    """A BERT-shaped toy: encoder.layer.i.{attention.self.{query,key,value}, ...}, classifier."""
    rng = np.random.default_rng(seed)
    layer = {}
    for i in range(layers):
        layer[i] = {
            "attention": {
                "self": {n: _linear(rng, hidden, hidden) for n in ("query", "key", "value")},
                "output": {
                    "dense": _linear(rng, hidden, hidden),
                    "LayerNorm": {"scale": jnp.ones(hidden), "bias": jnp.zeros(hidden)},
                },
            },
            "intermediate": {"dense": _linear(rng, hidden, inter)},
            "output": {"dense": _linear(rng, inter, hidden)},
        }
    return {
        "bert": {
            "embeddings": {"word_embeddings": {"embedding": jnp.ones((20, hidden))}},
            "encoder": {"layer": layer},
        },
        "classifier": _linear(rng, hidden, labels),
    }


@jax.jit
def toy_forward(params, x):
    """Dense-only network through every Linear, using the fused-LoRA convention of `dense`."""

    def dense(p, h):
        y = h @ p["kernel"] + p["bias"]
        if "lora_a" in p:
            y = y + p["lora_scale"] * ((h @ p["lora_a"]) @ p["lora_b"])
        return y

    h = x
    for i in sorted(params["bert"]["encoder"]["layer"]):
        lp = params["bert"]["encoder"]["layer"][i]
        att = lp["attention"]
        q, k, v = (dense(att["self"][n], h) for n in ("query", "key", "value"))
        h = jnp.tanh(dense(att["output"]["dense"], q * k + v))
        h = h * att["output"]["LayerNorm"]["scale"] + att["output"]["LayerNorm"]["bias"]
        h = jnp.tanh(dense(lp["output"]["dense"], jnp.tanh(dense(lp["intermediate"]["dense"], h))))
    return dense(params["classifier"], h)


def randomize(adapters, seed=1, std=0.3):
    """Adds numpy Gaussian noise to every adapters leaf (no per-shape jax compilation)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + std * rng.normal(size=x.shape).astype(x.dtype), adapters)


Q = "bert.encoder.layer.{}.attention.self.query"
V = "bert.encoder.layer.{}.attention.self.value"


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(r=0), "r"),
        (dict(r=-2), "r"),
        (dict(r=2.5), "r"),
        (dict(alpha=0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(targets=()), "targets"),
        (dict(targets="("), "targets"),
        (dict(init="kaiming"), "init"),
        (dict(bias="some"), "bias"),
        (dict(rank_pattern={"query": 0}), "rank_pattern"),
        (dict(alpha_pattern={"query": -1}), "alpha_pattern"),
        (dict(layers=(-1,)), "layers"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}"):
        lora.LoraConfig(**kwargs)


def test_config_normalizes_and_is_hashable():
    cfg = lora.LoraConfig(
        targets=["query", "value"], rank_pattern={"value": 2}, init="gaussian", bias="all", layers=1
    )
    assert cfg.targets == ("query", "value")
    assert cfg.rank_pattern == (("value", 2),)
    assert cfg.init is lora.LoraInit.GAUSSIAN and cfg.bias is lora.LoraBias.ALL
    assert cfg.layers == (1,)
    hash(cfg)
    assert lora.config_from_dict(lora.config_to_dict(cfg)) == cfg


# ------------------------------------------------------------------ targeting


def _targets(cfg, params=None):
    return list(lora.resolve(params or toy_params(), cfg).lora)


def test_targets_list_exact_or_suffix_and_regex_suffix_fullmatch():
    names = _targets(lora.LoraConfig(targets=("query", "value")))
    assert names == [p.format(i) for i in range(3) for p in (Q, V)]
    # The issue's example: a bare alternation regex matches as a dotted suffix.
    assert _targets(lora.LoraConfig(targets="query|value")) == names
    # A PEFT-style regex that fullmatches the whole path matches the same modules.
    assert _targets(lora.LoraConfig(targets=r".*\.(query|value)")) == names
    # Suffixes are whole dotted segments: "uery" is not a module name.
    with pytest.raises(ValueError, match="matched no Linear"):
        _targets(lora.LoraConfig(targets=("uery",)))
    # A dotted list entry matches a suffix of several segments.
    assert _targets(lora.LoraConfig(targets=("intermediate.dense",))) == [
        f"bert.encoder.layer.{i}.intermediate.dense" for i in range(3)
    ]


def test_exclude_layers_and_modules_to_save_are_excluded_from_targets():
    cfg = lora.LoraConfig(targets="dense|query", exclude=("output.dense",), layers=(0, 2))
    assert _targets(cfg) == [
        Q.format(0),
        "bert.encoder.layer.0.intermediate.dense",
        Q.format(2),
        "bert.encoder.layer.2.intermediate.dense",
    ]
    # Excluded by regex: fullmatch of a suffix, like targets.
    cfg = lora.LoraConfig(targets=("query",), exclude=r"layer\.1\..*")
    assert _targets(cfg) == [Q.format(0), Q.format(2)]
    # PEFT never puts LoRA inside a modules_to_save module, even if targeted.
    cfg = lora.LoraConfig(targets=("query", "classifier"), modules_to_save=("classifier",))
    assert _targets(cfg) == [Q.format(i) for i in range(3)]


def test_layer_index_uses_peft_default_rule():
    assert lora.targets.layer_index("bert.encoder.layer.11.attention.self.query") == 11
    assert lora.targets.layer_index("roberta.encoder.layer.0.output.dense") == 0
    assert lora.targets.layer_index("classifier.dense") is None


def test_no_match_error_quotes_targets_and_lists_real_paths():
    with pytest.raises(ValueError) as err:
        _targets(lora.LoraConfig(targets=("q_proj", "v_proj")))
    msg = str(err.value)
    assert "('q_proj', 'v_proj')" in msg
    assert Q.format(0) in msg and "classifier" in msg


def test_non_linear_target_is_an_error():
    with pytest.raises(ValueError, match="not Linear"):
        _targets(lora.LoraConfig(targets=("word_embeddings",)))
    with pytest.raises(ValueError, match="not Linear"):
        _targets(lora.LoraConfig(targets=("LayerNorm",)))


def test_rank_above_min_in_out_is_an_error():
    with pytest.raises(ValueError, match=r"r=4 .*classifier.*min\(8, 3\)"):
        _targets(lora.LoraConfig(r=4, targets=("classifier",)))


def test_rank_and_alpha_pattern_follow_peft_get_pattern_key():
    cfg = lora.LoraConfig(
        r=4,
        alpha=8,
        targets=("query", "value"),
        rank_pattern={"value": 2, r"layer\.2\.attention\.self\.query": 6},
        alpha_pattern={"layer.1.attention.self.query": 32},
    )
    plan = lora.resolve(toy_params(), cfg).lora
    # Hand table from PEFT's rule re.match(rf"(.*\.)?({key})$", name), first key wins.
    want = {
        Q.format(0): (4, 8.0),
        V.format(0): (2, 8.0),
        Q.format(1): (4, 32.0),
        V.format(1): (2, 8.0),
        Q.format(2): (6, 8.0),
        V.format(2): (2, 8.0),
    }
    assert {p: (t.r, t.alpha) for p, t in plan.items()} == want
    assert {p: t.scale for p, t in plan.items()} == {p: a / r for p, (r, a) in want.items()}
    # "uery" is not a dotted-segment suffix, so it does not match (PEFT: `(.*\.)?` prefix).
    cfg2 = lora.LoraConfig(r=4, targets=("query",), rank_pattern={"uery": 2})
    assert {t.r for t in lora.resolve(toy_params(), cfg2).lora.values()} == {4}


def test_rslora_scale():
    cfg = lora.LoraConfig(
        r=4,
        alpha=6,
        use_rslora=True,
        targets=("query",),
        rank_pattern={"layer.1.attention.self.query": 8},
    )
    plan = lora.resolve(toy_params(), cfg).lora
    assert plan[Q.format(0)].scale == pytest.approx(6 / math.sqrt(4))
    assert plan[Q.format(1)].scale == pytest.approx(6 / math.sqrt(8))


# ------------------------------------------------------------------ init


def test_init_kaiming_uniform_and_gaussian_distributions():
    hidden = 64
    params = toy_params(hidden=hidden, inter=64, layers=1)
    cfg = lora.LoraConfig(
        r=32, alpha=1, targets=("query", "value", "intermediate.dense", "output.dense")
    )
    adapters = lora.init(jax.random.key(0), params, cfg)
    a = np.concatenate([np.asarray(d["lora_a"]).ravel() for d in adapters.values()])
    bound = 1 / math.sqrt(hidden)  # torch kaiming_uniform_(a=sqrt(5)) on (r, in): 1/sqrt(in)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.97 * bound
    assert np.std(a) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert all(not np.any(np.asarray(d["lora_b"])) for d in adapters.values())
    # Different modules get different draws.
    assert not np.allclose(adapters[Q.format(0)]["lora_a"], adapters[V.format(0)]["lora_a"])

    g = lora.init(
        jax.random.key(0),
        params,
        lora.LoraConfig(r=32, alpha=1, init="gaussian", targets=cfg.targets),
    )
    ga = np.concatenate([np.asarray(d["lora_a"]).ravel() for d in g.values()])
    assert np.mean(ga) == pytest.approx(0.0, abs=0.01)
    assert np.std(ga) == pytest.approx(1 / 32, rel=0.05)  # PEFT: normal(std=1/r)


def test_init_shapes_dtype_bias_and_modules_to_save():
    params = toy_params()
    cfg = lora.LoraConfig(
        r=2, targets=("query",), bias="lora_only", modules_to_save=("classifier",)
    )
    adapters = lora.init(jax.random.key(0), params, cfg)
    assert sorted(adapters) == sorted([Q.format(i) for i in range(3)] + ["classifier"])
    assert adapters[Q.format(0)]["lora_a"].shape == (8, 2)
    assert adapters[Q.format(0)]["lora_b"].shape == (2, 8)
    assert adapters[Q.format(0)]["lora_a"].dtype == jnp.float32
    np.testing.assert_array_equal(
        adapters[Q.format(1)]["bias"],
        params["bert"]["encoder"]["layer"][1]["attention"]["self"]["query"]["bias"],
    )
    np.testing.assert_array_equal(adapters["classifier"]["kernel"], params["classifier"]["kernel"])

    all_bias = lora.init(
        jax.random.key(0), params, lora.LoraConfig(r=2, targets=("query",), bias="all")
    )
    n_bias_leaves = sum(1 for p in lora.core.tree_paths(params) if p.endswith(".bias"))
    assert sum("bias" in d for d in all_bias.values()) == n_bias_leaves


def test_init_rejects_pissa_config():
    with pytest.raises(ValueError, match="init_pissa"):
        lora.init(jax.random.key(0), toy_params(), lora.LoraConfig(init="pissa"))


# ------------------------------------------------------------------ apply / merge


def test_merged_kernel_equals_hand_written_w_plus_s_ba():
    params = toy_params()
    cfg = lora.LoraConfig(
        r=3, alpha=5, targets=("query", "value"), rank_pattern={"value": 2}, use_rslora=True
    )
    adapters = randomize(lora.init(jax.random.key(0), params, cfg))
    merged = lora.apply(params, adapters, cfg)
    for i in range(3):
        for path, name, r in ((Q, "query", 3), (V, "value", 2)):
            d = adapters[path.format(i)]
            a, b = np.asarray(d["lora_a"], np.float64), np.asarray(d["lora_b"], np.float64)
            w = np.asarray(
                params["bert"]["encoder"]["layer"][i]["attention"]["self"][name]["kernel"]
            )
            want = w + (5 / math.sqrt(r)) * a @ b
            got = merged["bert"]["encoder"]["layer"][i]["attention"]["self"][name]["kernel"]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Untargeted leaves are the very same arrays; the input params are not modified.
    assert (
        merged["bert"]["encoder"]["layer"][0]["attention"]["self"]["key"]["kernel"]
        is (params["bert"]["encoder"]["layer"][0]["attention"]["self"]["key"]["kernel"])
    )
    assert "lora_a" not in params["bert"]["encoder"]["layer"][0]["attention"]["self"]["query"]


def test_zero_b_init_leaves_function_unchanged():
    params = toy_params()
    cfg = lora.LoraConfig(r=2, targets="query|value|dense")
    adapters = lora.init(jax.random.key(3), params, cfg)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8)), jnp.float32)
    np.testing.assert_array_equal(
        toy_forward(lora.apply(params, adapters, cfg), x), toy_forward(params, x)
    )


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_fused_and_merged_paths_agree_on_dense_network(bias):
    # A wide intermediate layer so that fusion="auto" (auto) fuses some modules but not others.
    params = toy_params(inter=40)
    cfg = lora.LoraConfig(
        r=2, alpha=4, targets="query|value|dense", bias=bias, modules_to_save=("classifier",)
    )
    adapters = randomize(lora.init(jax.random.key(0), params, cfg))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8)), jnp.float32)
    merged = toy_forward(lora.apply(params, adapters, cfg), x)
    fused_params = lora.apply(params, adapters, cfg, fusion="fused")
    fused = toy_forward(fused_params, x)
    np.testing.assert_allclose(fused, merged, rtol=1e-4, atol=1e-4)
    auto_params = lora.apply(params, adapters, cfg, fusion="auto")
    layer0 = auto_params["bert"]["encoder"]["layer"][0]
    assert "lora_a" not in layer0["attention"]["self"]["query"]  # 3*2*(8+8)=96 >= 64: merged
    assert "lora_a" in layer0["intermediate"]["dense"]  # 3*2*(8+40)=288 < 320: fused
    np.testing.assert_allclose(toy_forward(auto_params, x), merged, rtol=1e-4, atol=1e-4)
    qp = fused_params["bert"]["encoder"]["layer"][0]["attention"]["self"]["query"]
    assert float(qp["lora_scale"]) == 2.0
    np.testing.assert_array_equal(
        qp["kernel"], params["bert"]["encoder"]["layer"][0]["attention"]["self"]["query"]["kernel"]
    )


def test_jit_equals_eager_and_merge_unmerge_round_trip():
    params = toy_params()
    cfg = lora.LoraConfig(r=2, alpha=16, targets=("query", "value", "intermediate.dense"))
    adapters = randomize(lora.init(jax.random.key(0), params, cfg), std=1.0)
    eager = lora.merge(params, adapters, cfg)
    jitted = jax.jit(lambda p, a: lora.merge(p, a, cfg))(params, adapters)
    for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    back = lora.unmerge(eager, adapters, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_gradients_flow_only_into_adapters():
    params = toy_params()
    cfg = lora.LoraConfig(r=2, alpha=4, targets=("query", "value"))
    adapters = lora.init(jax.random.key(0), params, cfg)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 8)), jnp.float32)

    for fusion in ("merged", "fused"):

        def loss(a, p=params, fusion=fusion):
            return jnp.sum(toy_forward(lora.apply(p, a, cfg, fusion=fusion), x) ** 2)

        g = jax.grad(loss)(adapters)
        # With B = 0: dL/dA = s * x^T dY B^T = 0, dL/dB = s * (xA)^T dY != 0 (LoRA's start).
        for d in g.values():
            assert not np.any(np.asarray(d["lora_a"]))
            assert np.any(np.asarray(d["lora_b"]))
        moved = jax.tree.map(lambda a, gg: a - 0.1 * gg, adapters, g)
        g2 = jax.grad(loss)(moved)
        assert all(np.any(np.asarray(d["lora_a"])) for d in g2.values())
        # Gradient w.r.t. the base through apply is not the adapters' business: the adapters'
        # gradient equals the hand-written chain rule through the merged kernel.
        path = Q.format(0)
        gk = jax.grad(lambda p: jnp.sum(toy_forward(p, x) ** 2))(lora.apply(params, moved, cfg))
        gk = np.asarray(gk["bert"]["encoder"]["layer"][0]["attention"]["self"]["query"]["kernel"])
        a, b = np.asarray(moved[path]["lora_a"]), np.asarray(moved[path]["lora_b"])
        np.testing.assert_allclose(g2[path]["lora_a"], 2.0 * gk @ b.T, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(g2[path]["lora_b"], 2.0 * a.T @ gk, rtol=1e-3, atol=1e-4)


def test_adapters_that_do_not_fit_are_rejected():
    params = toy_params()
    cfg = lora.LoraConfig(r=2, targets=("query",))
    adapters = lora.init(jax.random.key(0), params, cfg)
    with pytest.raises(ValueError, match=r"wrong shapes: .*lora_a got \(8, 2\) expected \(8, 3\)"):
        lora.apply(params, adapters, lora.LoraConfig(r=3, targets=("query",)))
    with pytest.raises(ValueError, match="missing 6 leaves"):
        lora.apply(params, adapters, lora.LoraConfig(r=2, targets=("query", "value")))
    bad = dict(adapters)
    bad["bert.encoder.layer.0.attention.self.nope"] = adapters[Q.format(0)]
    with pytest.raises(ValueError, match="unexpected 2 leaves"):
        lora.apply(params, bad, cfg)
    other = toy_params(hidden=6, inter=10)
    with pytest.raises(ValueError, match="do not fit"):
        lora.apply(other, adapters, cfg)


# ------------------------------------------------------------------ mask / count


def test_trainable_mask_and_count_match_hand_counts():
    params = toy_params(hidden=8, inter=12, layers=3, labels=3)
    cfg = lora.LoraConfig(
        r=2,
        targets=("query", "intermediate.dense"),
        rank_pattern={"intermediate.dense": 4},
        bias="lora_only",
        modules_to_save=("classifier",),
    )
    adapters = lora.init(jax.random.key(0), params, cfg)
    mask = lora.trainable_mask(params, cfg)
    true_paths = sorted(
        p for p, m in zip(lora.core.tree_paths(mask), jax.tree.leaves(mask), strict=True) if m
    )
    want = sorted(
        [f"{Q.format(i)}.{leaf}" for i in range(3) for leaf in ("kernel", "bias")]
        + [
            f"bert.encoder.layer.{i}.intermediate.dense.{leaf}"
            for i in range(3)
            for leaf in ("kernel", "bias")
        ]
        + ["classifier.kernel", "classifier.bias"]
    )
    assert true_paths == want
    c = lora.count(params, adapters)
    # r * (in + out) per target + trainable biases + the classifier copy.
    hand = 3 * (2 * (8 + 8) + 8) + 3 * (4 * (8 + 12) + 12) + (8 * 3 + 3)
    assert c.trainable == hand
    base = sum(x.size for x in jax.tree.leaves(params))
    assert c.base == base
    assert c.total == base + 3 * 2 * (8 + 8) + 3 * 4 * (8 + 12)
    text = str(c)
    assert Q.format(2) in text and "saved" in text and f"trainable params: {hand:,}" in text


# ------------------------------------------------------------------ io


def test_save_load_round_trip(tmp_path):
    params = toy_params()
    cfg = lora.LoraConfig(
        r=2, alpha=3, targets="query", bias="all", rank_pattern={"layer.1.attention.self.query": 1}
    )
    adapters = randomize(lora.init(jax.random.key(0), params, cfg))
    lora.save(tmp_path / "a.safetensors", adapters, cfg)
    back, cfg2 = lora.load(tmp_path / "a.safetensors")
    assert cfg2 == cfg
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(x, y)
    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), adapters)
    lora.save(tmp_path / "b.safetensors", bf, cfg)
    assert jax.tree.leaves(lora.load(tmp_path / "b.safetensors")[0])[0].dtype == jnp.bfloat16
    lora.save_peft(tmp_path / "peft", adapters, cfg)
    with pytest.raises(ValueError, match="no lora_jax metadata"):
        lora.load(tmp_path / "peft" / "adapter_model.safetensors")


# ------------------------------------------------------------------ named adapters


def test_combine_cat_is_exact_weighted_sum_of_deltas():
    params = toy_params()
    cfg_a = lora.LoraConfig(r=2, alpha=4, targets=("query", "value"))
    cfg_b = lora.LoraConfig(r=3, alpha=3, targets=("query", "intermediate.dense"), use_rslora=True)
    a = randomize(lora.init(jax.random.key(0), params, cfg_a), seed=1)
    b = randomize(lora.init(jax.random.key(1), params, cfg_b), seed=2)
    named = {"a": (a, cfg_a), "b": (b, cfg_b)}
    combo, cfg_c = lora.combine(named, {"a": 0.7, "b": -1.5}, method="cat")
    merged = lora.apply(params, combo, cfg_c)
    ranks = {p: t.r for p, t in lora.resolve(params, cfg_c).lora.items()}
    assert ranks[Q.format(0)] == 5 and ranks[V.format(0)] == 2
    assert ranks["bert.encoder.layer.0.intermediate.dense"] == 3
    for path in (Q.format(1), V.format(2), "bert.encoder.layer.0.intermediate.dense"):
        want = np.zeros((8, 12 if "intermediate" in path else 8))
        if path in a:
            want += 0.7 * 2.0 * np.asarray(a[path]["lora_a"]) @ np.asarray(a[path]["lora_b"])
        if path in b:
            want += (
                -1.5
                * (3 / math.sqrt(3))
                * np.asarray(b[path]["lora_a"])
                @ np.asarray(b[path]["lora_b"])
            )
        keys = lora.resolve(params, cfg_c).keys[path]
        base = lora.targets.get_module(params, keys)["kernel"]
        got = lora.targets.get_module(merged, keys)["kernel"]
        np.testing.assert_allclose(np.asarray(got) - np.asarray(base), want, rtol=1e-4, atol=1e-5)
    # Both active = sum of both deltas; equals merging one after the other.
    both = lora.apply_named(params, {"a": (a, cfg_a), "b": (b, cfg_b)}, ["a", "b"])
    seq = lora.apply(lora.merge_named(params, named, "a"), b, cfg_b)
    for x, y in zip(jax.tree.leaves(both), jax.tree.leaves(seq), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    only_b = lora.apply_named(params, named, "b", fusion="fused")
    assert "lora_a" in only_b["bert"]["encoder"]["layer"][0]["intermediate"]["dense"]


def test_combine_linear_single_adapter_and_errors():
    params = toy_params()
    cfg = lora.LoraConfig(r=2, alpha=4, targets=("query",))
    a = randomize(lora.init(jax.random.key(0), params, cfg))
    combo, cfg_c = lora.combine({"a": (a, cfg)}, {"a": 0.5}, method="linear")
    got = lora.apply(params, combo, cfg_c)
    want = lora.apply(
        params,
        jax.tree.map(
            lambda x: x,
            {p: {"lora_a": d["lora_a"] * 0.5, "lora_b": d["lora_b"]} for p, d in a.items()},
        ),
        cfg,
    )
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    cfg3 = lora.LoraConfig(r=3, targets=("query",))
    b = lora.init(jax.random.key(1), params, cfg3)
    with pytest.raises(ValueError, match="equal ranks"):
        lora.combine({"a": (a, cfg), "b": (b, cfg3)}, {"a": 1, "b": 1}, method="linear")
    with pytest.raises(ValueError, match="No adapter named 'c'"):
        lora.combine({"a": (a, cfg)}, {"c": 1})
    cfg_bias = lora.LoraConfig(r=2, targets=("query",), bias="lora_only")
    with pytest.raises(ValueError, match="only handles LoRA factors"):
        lora.combine({"a": (lora.init(jax.random.key(0), params, cfg_bias), cfg_bias)}, {"a": 1})
    with pytest.raises(ValueError, match="method='svd'"):
        lora.combine({"a": (a, cfg)}, {"a": 1}, method="svd")


# ------------------------------------------------------------------ PiSSA


def test_pissa_init_residual_plus_adapter_is_base_and_converts_exactly():
    params = toy_params(hidden=8, inter=12)
    cfg = lora.LoraConfig(r=3, alpha=6, targets=("query", "intermediate.dense"), init="pissa")
    residual, init_ad = lora.init_pissa(params, cfg)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8)), jnp.float32)
    np.testing.assert_allclose(
        toy_forward(lora.apply(residual, init_ad, cfg), x), toy_forward(params, x), atol=1e-4
    )
    # The adapter is the best rank-3 approximation: scale * A @ B = U_r S_r Vh_r (numpy SVD).
    path = Q.format(0)
    w = np.asarray(
        params["bert"]["encoder"]["layer"][0]["attention"]["self"]["query"]["kernel"], np.float64
    )
    u, s, vh = np.linalg.svd(w)
    want = (u[:, :3] * s[:3]) @ vh[:3]
    got = 2.0 * np.asarray(init_ad[path]["lora_a"]) @ np.asarray(init_ad[path]["lora_b"])
    np.testing.assert_allclose(got, want, atol=1e-4)
    # After "training", the cat conversion gives a plain adapter for the original base.
    trained = randomize(init_ad, std=0.1)
    conv, cfg_conv = lora.combine({"t": (trained, cfg), "i": (init_ad, cfg)}, {"t": 1.0, "i": -1.0})
    np.testing.assert_allclose(
        toy_forward(lora.apply(params, conv, cfg_conv), x),
        toy_forward(lora.apply(residual, trained, cfg), x),
        atol=1e-4,
    )


# ------------------------------------------------------------------ real model


@pytest.fixture(scope="module")
def tiny_roberta(tiny_encoder_config):
    from lora_jax.models import create, split

    return split(create(tiny_encoder_config, head="cls", num_labels=3, seed=0))


def test_fused_and_merged_agree_through_the_real_model(tiny_roberta):
    apply_fn, params = tiny_roberta
    cfg = lora.LoraConfig(
        r=4, alpha=8, targets="query|value|dense", modules_to_save=("classifier",), bias="lora_only"
    )
    adapters = randomize(lora.init(jax.random.key(0), params, cfg), std=0.2)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 50, size=(2, 7)), jnp.int32)
    fwd = jax.jit(apply_fn)
    base = fwd(params, ids)
    merged = fwd(lora.apply(params, adapters, cfg), ids)
    fused = fwd(lora.apply(params, adapters, cfg, fusion="fused"), ids)
    assert np.abs(np.asarray(merged - base)).max() > 1e-2
    np.testing.assert_allclose(fused, merged, rtol=1e-5, atol=1e-5)
    axes = lora.logical_axes(adapters)
    assert axes["roberta.encoder.layer.0.attention.self.query"] == {
        "lora_a": ("embed", "lora_rank"),
        "lora_b": ("lora_rank", "heads"),
        "bias": ("heads",),
    }
    assert axes["classifier.out_proj"]["kernel"] == ("embed", None)
    # dense paths in a real model: classifier.dense is inside modules_to_save, so not targeted.
    targets = lora.resolve(params, cfg).lora
    assert "classifier.dense" not in targets and "roberta.encoder.layer.1.output.dense" in targets


def test_pissa_guard_sees_every_pissa_adapter(tmp_path):
    """init_pissa used to accept any cfg.init, so save_peft's PiSSA guard missed the usual case."""
    params = toy_params(hidden=8, inter=12)
    plain_cfg = lora.LoraConfig(r=2, alpha=4, targets=("query",))  # init left at its default
    with pytest.raises(ConfigError, match="init='pissa'"):
        lora.init_pissa(params, plain_cfg)
    cfg = lora.LoraConfig(r=2, alpha=4, targets=("query",), init="pissa")
    residual, initial = lora.init_pissa(params, cfg)
    trained = randomize(initial, std=0.1)
    with pytest.raises(ConfigError, match="residual base"):
        lora.save_peft(tmp_path / "no", trained, cfg)
    assert not (tmp_path / "no").exists()  # nothing half-written
    # The conversion the message names runs, and round-trips through PEFT's format.
    conv, conv_cfg = lora.combine({"t": (trained, cfg), "i": (initial, cfg)}, {"t": 1.0, "i": -1.0})
    lora.save_peft(tmp_path / "peft", conv, conv_cfg)
    loaded, loaded_cfg = lora.load_peft(tmp_path / "peft")
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 8)), jnp.float32)
    np.testing.assert_allclose(
        toy_forward(lora.apply(params, loaded, loaded_cfg), x),
        toy_forward(lora.apply(residual, trained, cfg), x),
        atol=1e-4,
    )


@pytest.mark.parametrize("model_type", sorted(lora.DEFAULT_TARGETS))
def test_default_targets_are_query_and_value_of_every_layer(tiny_encoder_config, model_type):
    # PEFT's default targets for the model type hit exactly q and v of each layer, no more.
    config = dataclasses.replace(tiny_encoder_config, model_type=model_type, type_vocab_size=2)
    _, params = models.split(models.create(config, head=None))
    plan = lora.resolve(params, lora.LoraConfig(targets=lora.default_targets(model_type)))
    names = sorted(path.rsplit(".", 1)[-1] for path in plan.lora)
    suffix = "_proj" if model_type == "deberta-v2" else ""
    expected = [f"query{suffix}"] * 2 + [f"value{suffix}"] * 2
    assert names == expected
    with pytest.raises(ConfigError, match="No default LoRA targets for model_type 'gpt2'"):
        lora.default_targets("gpt2")
