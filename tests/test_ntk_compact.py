"""The all-weights eNTK of an encoder with compacted embedding tables vs a dense J J^T oracle.

Also: the kernel cache tells two verbalizers apart, compiled block programs are reused across
``ntk_fn`` s, and a refused block names an alternative that then runs within the same limit.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk
from lora_jax import models
from lora_jax.readout import make_output_fn
from ntk import _jacobians, _padding, _programs, _testing, compact
from ntk import kernel as kernel_lib

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

V = 48


def _encoder(model_type, dtype, readout="tied", words=(5, 9)):
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
    return make_output_fn(apply_fn, readout, label_word_ids=np.array(words)), params


def _batch(n, seed, types, t=7):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V // 2, size=(n, t)).astype(np.int32)  # rows V/2.. never read
    mask = np.ones((n, t), np.int32)
    mask[::2, -2:] = 0  # padding at the end of every other row
    ids[::2, -2:] = 1 if types == 1 else 0  # the pad token
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "mask_pos": rng.integers(1, t - 2, n).astype(np.int32),
    }
    if types == 2:
        batch["token_type_ids"] = (np.arange(t) >= t // 2).astype(np.int32)[None].repeat(n, 0)
    return batch


@pytest.mark.parametrize(
    ("model_type", "readout", "vmap_axes"), [("bert", "tied", 0), ("roberta", "tied_mean", None)]
)
def test_all_weights_kernel_with_compacted_tables_equals_dense_jjt(
    monkeypatch, model_type, readout, vmap_axes
):
    monkeypatch.setattr(compact, "ROW_BUCKET", 32)  # the 48-row word table cut to 32 rows
    with jax.enable_x64():
        output_fn, params = _encoder(model_type, jnp.float64, readout)
        f, params, info = ntk.kernel_model(output_fn, params, "all")
        types = 2 if model_type == "bert" else 1
        x1, x2 = _batch(3, 0, types), _batch(5, 1, types)
        tables = compact.compactable_tables(info.embedding_rows, params)
        assert any("word_embeddings" in p for p in tables)
        assert any("position_embeddings" in p for p in tables)
        small, _ = compact.compact_block(info.embedding_rows, params, [x1, x2], tables)
        word = [p for p in tables if "word" in p][0].split(".")
        node = small
        for key in word:
            node = node[key]
        assert node.shape[0] == 32  # really compacted (V = 48)
        ntk_fn = ntk.empirical_ntk_fn(
            f, trace_axes=(), vmap_axes=vmap_axes, batch_size=(2, 3), model_info=info
        )
        got = ntk_fn(x1, x2, params)  # 2 x 2 blocks, the last ones padded
        assert got.shape == (3, 5, 2, 2) and got.dtype == np.float64
        dense = _testing.hand_ntk(f, params, x1, x2)  # jacrev over the full [V, H] tables
        np.testing.assert_allclose(got, dense, rtol=1e-10, atol=1e-10)
        if vmap_axes == 0:  # symmetric: the upper triangle of 2 x 2 row blocks, mirrored
            sym = ntk.empirical_ntk_fn(
                f, trace_axes=(), vmap_axes=0, batch_size=3, model_info=info
            )(x2, None, params)
            dense = _testing.hand_ntk(f, params, x2)
            np.testing.assert_allclose(sym, dense, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("x2_rows", "batch_size", "trace_axes", "diagonal_axes"),
    [
        (None, 5, (), ()),  # symmetric, one fused block
        (None, 5, (-1,), ()),
        (None, 2, (), ()),  # symmetric blocks (kept Jacobians, upper triangle)
        (4, (2, 3), (), ()),  # x1 x x2 blocks, padded last blocks
        (4, (2, 3), (), (-1,)),
        (4, (5, 4), (), ()),  # x1 x x2, one block each: one program on the joined rows
        (4, (5, 4), (-1,), ()),
    ],
    ids=[
        "fused",
        "fused-traced",
        "symmetric-blocks",
        "x1-x2-blocks",
        "x1-x2-diagonal",
        "x1-x2-joined",
        "x1-x2-joined-traced",
    ],
)
@pytest.mark.parametrize("gram_chunk", [None, 24], ids=["whole", "sliced"])
def test_reused_and_fused_kernels_equal_dense_jjt_in_every_layout(
    monkeypatch, x2_rows, batch_size, trace_axes, diagonal_axes, gram_chunk
):
    """Every path of the kept-Jacobian kernel (one fused block, symmetric blocks, x1 x x2
    blocks with padded last blocks) and every output layout, against hand-built J J^T; with
    the Gram products whole, and in column slices of 24 (a remainder on most leaves)."""
    monkeypatch.setattr(compact, "ROW_BUCKET", 32)
    if gram_chunk is not None:
        monkeypatch.setattr(_jacobians, "GRAM_CHUNK", gram_chunk)
    monkeypatch.setattr(_programs, "_PROGRAMS", collections.OrderedDict())  # a fresh cache
    with jax.enable_x64():
        output_fn, params = _encoder("bert", jnp.float64, words=(5, 9, 12))  # K = 3
        f, params, info = ntk.kernel_model(output_fn, params, "all")
        x1 = _batch(5, 2, 2)
        x2 = None if x2_rows is None else _batch(x2_rows, 3, 2)
        got = ntk.empirical_ntk_fn(
            f,
            trace_axes=trace_axes,
            diagonal_axes=diagonal_axes,
            vmap_axes=0,
            batch_size=batch_size,
            model_info=info,
        )(x1, x2, params)
        joined = x2 is not None and batch_size == (5, 4)
        assert joined == any(key[1][:1] == ("pair",) for key in _programs._PROGRAMS)
        dense = _testing.hand_ntk(f, params, x1, x2)  # (N1, N2, K, K)
        k_diag = np.diagonal(dense, axis1=2, axis2=3)  # (N1, N2, K)
        want = {(): dense, (-1,): k_diag.mean(-1)}[trace_axes] if not diagonal_axes else k_diag
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_undeclared_embedding_rows_are_caught(monkeypatch):
    monkeypatch.setattr(compact, "ROW_BUCKET", 8)
    output_fn, params = _encoder("bert", jnp.float32, words=(40, 41))  # rows no input reads
    f, params, info = ntk.kernel_model(output_fn, params, "all")
    info = info._replace(embedding_rows=np.zeros(0, np.int32))  # wrong: no label rows
    with pytest.raises(ValueError, match="embedding_rows"):
        ntk.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, model_info=info)(
            _batch(2, 0, 2), None, params
        )


def test_cache_tells_verbalizers_apart(tmp_path):
    """Same code, data and weights; different label words: two kernels, two cache files."""
    kernels = []
    for words in ((5, 9), (7, 11), (5, 9)):
        output_fn, params = _encoder("bert", jnp.float32, words=words)
        f, sub, info = ntk.kernel_model(output_fn, params, r"encoder\.layer\.0\.output\.dense")
        ntk_fn = ntk.empirical_ntk_fn(
            f, trace_axes=(), vmap_axes=0, cache_dir=tmp_path, model_info=info
        )
        kernels.append(ntk_fn(_batch(3, 0, 2), None, sub))
    assert len(list(tmp_path.glob("ntk-*.npy"))) == 2
    assert not np.allclose(kernels[0], kernels[1])
    np.testing.assert_array_equal(kernels[0], kernels[2])  # the first entry, from disk


def test_compiled_programs_are_reused_across_ntk_fns():
    output_fn, params = _encoder("bert", jnp.float32)
    f, sub, _ = ntk.kernel_model(output_fn, params, r"encoder\.layer\.0\.output\.dense")
    traces = []

    def counted(p, b):
        traces.append(1)
        return f(p, b)

    info = ntk.ModelInfo(fingerprint="test: counted bert")  # names what counted computes
    x = _batch(4, 0, 2)
    first = ntk.empirical_ntk_fn(counted, vmap_axes=0, batch_size=2, model_info=info)(x, None, sub)
    n = len(traces)
    again = ntk.empirical_ntk_fn(counted, vmap_axes=0, batch_size=2, model_info=info)(  # new
        x, None, sub
    )
    assert len(traces) == n  # nothing traced, nothing compiled
    np.testing.assert_array_equal(first, again)


def test_refused_block_names_an_alternative_that_fits():
    output_fn, params = _encoder("bert", jnp.float32)
    f, params, info = ntk.kernel_model(output_fn, params, "all")
    x = _batch(2, 0, 2)
    opts = kernel_lib.kernel_options((), (), 0, 1, 2, None)
    tables = compact.compactable_tables(info.embedding_rows, params)
    p, (xc,) = compact.compact_block(info.embedding_rows, params, [x], tables)
    fn = compact.compact_fn(f, tables)
    key = (*kernel_lib.program_fn_key(f, info), tables)
    jc = kernel_lib.block_program(fn, key, opts.implementation, opts, xc, None, p)
    limit = ntk.kernel.required_bytes(jc) + 1  # JACOBIAN_CONTRACTION just fits
    structured = ntk.empirical_ntk_fn(
        f,
        trace_axes=(),
        vmap_axes=0,
        memory_limit_bytes=limit,
        implementation=ntk.NtkImplementation.STRUCTURED_DERIVATIVES,
        model_info=info,
    )
    with pytest.raises(ntk.KernelMemoryError, match="Use implementation=") as err:
        structured(x, None, params)
    suggested = str(err.value).split("Use implementation=")[1].split(" ")[0]
    assert suggested != "STRUCTURED_DERIVATIVES"
    k = ntk.empirical_ntk_fn(
        f,
        trace_axes=(),
        vmap_axes=0,
        memory_limit_bytes=limit,
        implementation=ntk.NtkImplementation[suggested],
        model_info=info,
    )(x, None, params)
    assert k.shape == (2, 2, 2, 2) and np.isfinite(k).all()


def _ragged_batch(lengths, seed, types, t=9):
    """Rows of the given real lengths, padded (mask 0, the pad id) to t tokens."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    ids = rng.integers(3, V // 2, size=(n, t)).astype(np.int32)
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids[mask == 0] = 1 if types == 1 else 0
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "mask_pos": np.asarray([rng.integers(0, n_real) for n_real in lengths], np.int32),
    }
    if types == 2:
        batch["token_type_ids"] = (np.arange(t) >= 2).astype(np.int32)[None].repeat(n, 0)
    return batch


def test_padding_lengths_and_cut():
    x = _ragged_batch([2, 7, 3], 0, 2)
    np.testing.assert_array_equal(_padding.lengths(x), [2, 7, 3])
    assert _padding.cut(x)["input_ids"].shape == (3, 8)  # 7 rounded up to 8
    assert _padding.cut(_ragged_batch([9, 2], 0, 2))["input_ids"].shape == (2, 9)
    order, s = _padding.sort_by_length(x)
    np.testing.assert_array_equal(order, [0, 2, 1])
    np.testing.assert_array_equal(s["attention_mask"].sum(1), [2, 3, 7])


@pytest.mark.parametrize(
    ("model_type", "x2_lengths", "batch_size"),
    [
        ("bert", None, 6),  # symmetric, one fused block, cut
        ("roberta", None, 2),  # symmetric blocks of sorted rows, each cut
        ("bert", (4, 9, 2, 3), (2, 3)),  # x1 x x2, sorted, padded last blocks
    ],
)
def test_cut_padding_gives_the_dense_kernel_of_the_full_rows(
    monkeypatch, model_type, x2_lengths, batch_size
):
    """Rows sorted by length and blocks cut to their longest row give J J^T of the padded
    rows, in the callers' row order; the cut really happens."""
    monkeypatch.setattr(compact, "ROW_BUCKET", 32)
    monkeypatch.setattr(ntk._padding, "LENGTH_MULTIPLE", 1)
    seen = []
    cut = _padding.cut
    monkeypatch.setattr(ntk._padding, "cut", lambda x, **kw: seen.append(cut(x, **kw)) or seen[-1])
    with jax.enable_x64():
        output_fn, params = _encoder(model_type, jnp.float64, "tied_mean")
        f, params, info = ntk.kernel_model(output_fn, params, "all")
        types = 2 if model_type == "bert" else 1
        x1 = _ragged_batch([5, 2, 8, 3, 7, 2], 4, types)  # one block cut to 8
        x2 = None if x2_lengths is None else _ragged_batch(x2_lengths, 5, types)
        got = ntk.empirical_ntk_fn(
            f, trace_axes=(), vmap_axes=0, batch_size=batch_size, model_info=info
        )(x1, x2, params)
        np.testing.assert_allclose(
            got, _testing.hand_ntk(f, params, x1, x2), rtol=1e-10, atol=1e-10
        )
    assert min(b["input_ids"].shape[1] for b in seen) < 9


def test_only_declared_functions_are_cut():
    output_fn, params = _encoder("bert", jnp.float32)
    x = _ragged_batch([2, 3], 0, 2)
    _, _, info = ntk.kernel_model(output_fn, params, "all")
    assert _padding.cuts(info.ignores_padding, x)
    assert not _padding.cuts(ntk.ModelInfo().ignores_padding, x)  # same model, no declaration
