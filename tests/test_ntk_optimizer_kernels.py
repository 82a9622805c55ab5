"""The SGD, SignGD and A-SignGD kernels (``ntk.Kernel``) against hand-built references.

The oracle: per-example gradients ``G [N, K, P]`` by ``jax.jacrev`` over the full, dense,
padded model (no compaction, no cuts, no blocks), then ``phi_1(G1) phi_2(G2)^T`` written out
with einsum, ``phi`` the identity or ``sign`` as each kernel says.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk
from lora_jax import lora, models
from lora_jax.errors import ConfigError
from lora_jax.readout import make_output_fn
from ntk import compact
from ntk import kernel as kernel_lib

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

V = 48
KERNELS = list(ntk.Kernel)


def _encoder(dtype, model_type="bert"):
    cfg = models.EncoderConfig(
        model_type=model_type,
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=24,
        type_vocab_size=2 if model_type == "bert" else 1,
        pad_token_id=1 if model_type == "roberta" else 0,
    )
    apply_fn, params = models.split(models.create(cfg, head=None, dtype=dtype))
    return make_output_fn(apply_fn, "tied", label_word_ids=np.array([5, 9, 11])), params


def _batch(n, seed, t=12, pad=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V // 2, size=(n, t)).astype(np.int32)  # rows V/2.. never read
    mask = np.ones((n, t), np.int32)
    mask[::2, -7:] = 0  # every other row: 5 real tokens, so blocks of them are cut to 8
    ids[::2, -7:] = pad
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mask_pos": rng.integers(1, 4, n).astype(np.int32),
        "token_type_ids": np.zeros((n, t), np.int32),
    }


def _grads(f, params, x) -> np.ndarray:
    """``[N, K, P]``: per-example gradients by ``jax.jacrev`` of the whole dense model."""
    jac = jax.jacrev(f)(params, x)
    leaves = jax.tree.leaves(jac)
    n, k = leaves[0].shape[:2]
    return np.concatenate([np.asarray(j).reshape(n, k, -1) for j in leaves], axis=-1)


def _reference(kernel, f, params, x1, x2=None) -> np.ndarray:
    """``[N1, N2, K, K]``: ``phi_1(G1) phi_2(G2)^T`` by einsum."""
    g1 = _grads(f, params, x1)
    g2 = g1 if x2 is None else _grads(f, params, x2)
    s1, s2 = {
        ntk.Kernel.SGD: (False, False),
        ntk.Kernel.SIGNGD: (True, True),
        ntk.Kernel.ASIGNGD: (False, True),
    }[kernel]
    a = np.sign(g1) if s1 else g1
    b = np.sign(g2) if s2 else g2
    return np.einsum("akp,blp->abkl", a, b)


def _no_key_bias(path: str) -> bool:
    # The key bias has a mathematically zero gradient (softmax is shift-invariant), so its
    # float gradient is round-off whose sign depends on the order of operations: SIGNGD counts
    # it (+-1 per entry), so the oracle leaves it out (A-SIGNGD multiplies it by round-off).
    return "key.bias" not in path


LAYOUTS = {  # name: (rows of x2 or None, batch_size, trace_axes)
    "fused": (None, 6, ()),  # x1 with itself, one fused block
    "self-blocks": (None, 2, ()),  # x1 with itself in 2-row blocks (every block for A-SignGD)
    "x1-x2-blocks": (4, (2, 3), ()),  # last blocks padded; kept Jacobians of x2
    "x1-x2-joined-traced": (4, (6, 4), (-1,)),  # one block each: one program, joined rows
}
CASES = [
    ("sgd", "x1-x2-blocks"),
    ("signgd", "self-blocks"),
    ("signgd", "x1-x2-blocks"),
    *(("asigngd", layout) for layout in LAYOUTS),
]


@pytest.mark.parametrize(("kernel", "layout"), CASES, ids=[f"{k}-{lay}" for k, lay in CASES])
def test_all_weights_kernels_equal_hand_built_with_compaction_and_padding_cut(
    monkeypatch, kernel, layout
):
    kernel = ntk.Kernel(kernel)
    x2_rows, batch_size, trace_axes = LAYOUTS[layout]
    monkeypatch.setattr(compact, "ROW_BUCKET", 32)  # the 48-row word table cut to 32 rows
    with jax.enable_x64():
        output_fn, params = _encoder(jnp.float64)
        subset = _no_key_bias if kernel == ntk.Kernel.SIGNGD else "all"
        f, sub, info = ntk.kernel_model(output_fn, params, subset)
        assert info.ignores_padding and info.embedding_rows is not None
        assert compact.compactable_tables(info.embedding_rows, sub)  # tables compacted
        x1 = _batch(6, 0)
        x2 = None if x2_rows is None else _batch(x2_rows, 1)
        ntk_fn = ntk.empirical_ntk_fn(
            f,
            trace_axes=trace_axes,
            vmap_axes=0,
            batch_size=batch_size,
            model_info=info,
            kernel=kernel,
        )
        got = ntk_fn(x1, x2, sub)
        want = _reference(kernel, f, sub, x1, x2)
        if trace_axes:
            want = np.einsum("abkk->ab", want) / want.shape[-1]
        assert got.shape == want.shape and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
        if kernel == ntk.Kernel.ASIGNGD and x2 is None:  # really not symmetric
            assert not np.allclose(got, np.swapaxes(np.swapaxes(got, 0, 1), 2, 3))


@pytest.mark.parametrize("kernel", KERNELS[1:], ids=[k.value for k in KERNELS[1:]])
def test_lora_and_regex_subset_kernels_equal_hand_built(kernel):
    with jax.enable_x64():
        output_fn, params = _encoder(jnp.float64, "roberta")
        cfg = lora.LoraConfig(r=2, alpha=4.0, targets=("query", "value"))
        adapters = lora.init(jax.random.PRNGKey(1), params, cfg)
        adapters = jax.tree.map(lambda a: a.astype(jnp.float64) + 0.05, adapters)  # B != 0
        x1, x2 = _batch(3, 2, pad=1), _batch(5, 3, pad=1)
        for f, sub, info in (
            ntk.lora_kernel_model(output_fn, params, adapters, cfg),
            ntk.kernel_model(output_fn, params, r"attention\.output\.dense\.kernel"),
        ):
            got = ntk.empirical_ntk_fn(
                f, trace_axes=(), vmap_axes=0, batch_size=(2, 2), model_info=info, kernel=kernel
            )(x1, x2, sub)
            np.testing.assert_allclose(
                got, _reference(kernel, f, sub, x1, x2), rtol=1e-10, atol=1e-10
            )


@pytest.mark.parametrize("kernel", [ntk.Kernel.SIGNGD, ntk.Kernel.ASIGNGD], ids=["sgn", "asgn"])
def test_per_block_path_when_kept_jacobians_do_not_fit(monkeypatch, kernel):
    """The block-by-block program (both sides differentiated per block), taken when the kept
    Jacobians do not fit, gives the same kernel."""
    monkeypatch.setattr(kernel_lib, "_kept_jacobians_kernel", lambda *a, **k: False)
    with jax.enable_x64():
        output_fn, params = _encoder(jnp.float64)
        f, sub, info = ntk.kernel_model(output_fn, params, r"intermediate\.dense")
        x1, x2 = _batch(5, 4), _batch(3, 5)
        for a, b in ((x1, x2), (x1, None)):
            got = ntk.empirical_ntk_fn(
                f, trace_axes=(), vmap_axes=0, batch_size=2, model_info=info, kernel=kernel
            )(a, b, sub)
            np.testing.assert_allclose(
                got, _reference(kernel, f, sub, a, b), rtol=1e-10, atol=1e-10
            )


def test_sign_kernels_refuse_what_cannot_compute_them_and_cache_apart(tmp_path):
    output_fn, params = _encoder(jnp.float32)
    f, sub, info = ntk.kernel_model(output_fn, params, r"intermediate\.dense\.kernel")
    for bad in (
        dict(implementation=ntk.NtkImplementation.STRUCTURED_DERIVATIVES, vmap_axes=0),
        dict(vmap_axes=None),
        dict(vmap_axes=0, diagonal_axes=(0,)),
    ):
        with pytest.raises(ConfigError, match="kernel=ASIGNGD needs per-example gradients"):
            ntk.empirical_ntk_fn(f, kernel="asigngd", **bad)
    with pytest.raises(ConfigError, match="is not a Kernel"):
        ntk.empirical_ntk_fn(f, kernel="adam")
    x = _batch(3, 6)
    kernels = {}
    for kernel in KERNELS:
        fn = ntk.empirical_ntk_fn(
            f, vmap_axes=0, cache_dir=tmp_path, model_info=info, kernel=kernel
        )
        kernels[kernel] = fn(x, None, sub)
        np.testing.assert_array_equal(fn(x, None, sub), kernels[kernel])  # from the cache
    assert len(list(tmp_path.glob("ntk-*.npy"))) == 3
    assert not np.allclose(kernels[ntk.Kernel.SGD], kernels[ntk.Kernel.ASIGNGD])
    auto = ntk.auto_implementation(f, x, None, sub, vmap_axes=0, kernel="signgd")
    assert auto == ntk.NtkImplementation.JACOBIAN_CONTRACTION
    for kernel in ("asigngd", "signgd"):  # a block that does not fit: refused before running
        fn = ntk.empirical_ntk_fn(
            f, vmap_axes=0, model_info=info, kernel=kernel, memory_limit_bytes=1
        )
        with pytest.raises(ntk.KernelMemoryError, match="JACOBIAN_CONTRACTION needs"):
            fn(x, None, sub)
