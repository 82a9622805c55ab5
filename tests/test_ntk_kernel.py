"""ntk.empirical_ntk_fn: blocked eNTK on batch dicts vs a hand-built J J^T; memory check; cache."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk
from lora_jax.errors import ConfigError, UserError, user_message
from ntk import _testing

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

IMPLEMENTATIONS = [
    ntk.NtkImplementation.JACOBIAN_CONTRACTION,
    ntk.NtkImplementation.NTK_VECTOR_PRODUCTS,
    ntk.NtkImplementation.STRUCTURED_DERIVATIVES,
]


def _setup(dtype=jnp.float64):
    f, params = _testing.mlp(jax.random.PRNGKey(0), (4, 6, 3), dtype)

    def g(p, batch):  # a batch dict with a float and an int entry
        return f(p, {"x": batch["x"] + 0.1 * batch["ids"][:, None].astype(dtype)})

    x1 = {
        "x": jax.random.normal(jax.random.PRNGKey(1), (7, 4), dtype),
        "ids": jnp.arange(7, dtype=jnp.int32),
    }
    x2 = {
        "x": jax.random.normal(jax.random.PRNGKey(2), (5, 4), dtype),
        "ids": jnp.arange(5, dtype=jnp.int32) % 3,
    }
    return g, params, x1, x2


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS[::2])  # all three: encoder test
def test_blocked_kernel_matches_hand_built(implementation):
    with jax.enable_x64():
        g, params, x1, x2 = _setup()
        ntk_fn = ntk.empirical_ntk_fn(
            g,
            trace_axes=(),
            implementation=implementation,
            batch_size=3,  # ragged last block
        )
        got = ntk_fn(x1, x2, params)
        assert got.shape == (7, 5, 3, 3) and got.dtype == np.float64
        np.testing.assert_allclose(
            got, _testing.hand_ntk(g, params, x1, x2), **_testing.tolerance(np.float64)
        )


@pytest.mark.parametrize("symmetric", [False, True])
def test_trace_and_diagonal_axes(symmetric):
    with jax.enable_x64():
        g, params, x1, x2 = _setup()
        xb = x1 if symmetric else x2
        full = _testing.hand_ntk(g, params, x1, xb)  # (7, N2, 3, 3)
        cases = [
            ((), (), full),  # symmetric: upper blocks computed, lower ones mirrored
            ((-1,), (), np.einsum("abkk->ab", full) / 3),  # nt's trace is a mean
            ((), (-1,), np.einsum("abkk->abk", full)),
        ]
        for (trace_axes, diagonal_axes, expected), vmap_axes in itertools.product(cases, (None, 0)):
            # vmap_axes=0: Jacobians computed once per row and kept across blocks.
            ntk_fn = ntk.empirical_ntk_fn(
                g,
                trace_axes=trace_axes,
                diagonal_axes=diagonal_axes,
                batch_size=(3, 2),
                vmap_axes=vmap_axes,
            )
            got = ntk_fn(x1, None if symmetric else x2, params)
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, **_testing.tolerance(np.float64))


def test_batch_diagonal_vmap_axes_and_float32():
    g, params, x1, _ = _setup(jnp.float32)
    full = _testing.hand_ntk(g, params, x1)
    got = ntk.empirical_ntk_fn(g, trace_axes=(), diagonal_axes=(0,), batch_size=4)(x1, None, params)
    np.testing.assert_allclose(got, np.einsum("aakl->akl", full), **_testing.tolerance(np.float32))
    got = ntk.empirical_ntk_fn(g, trace_axes=(), vmap_axes=0, batch_size=4)(x1, None, params)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, full, **_testing.tolerance(np.float32))


def test_dtype_option_float64():
    g, params, x1, _ = _setup(jnp.float32)
    with pytest.raises(ValueError, match="enable_x64"):
        ntk.empirical_ntk_fn(g, dtype=jnp.float64)(x1, None, params)
    with jax.enable_x64():
        got = ntk.empirical_ntk_fn(g, dtype=jnp.float64, trace_axes=())(x1, None, params)
        p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        x64 = dict(x1, x=x1["x"].astype(jnp.float64))
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, _testing.hand_ntk(g, p64, x64), rtol=1e-12)


def test_linear_model_kernel_is_gram_matrix():
    # f(W, x) = x W (K outputs): Theta(x, x')_{kl} = <x, x'> delta_kl, exactly.
    x1 = {"x": np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)}
    x2 = {"x": np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)}
    w = jnp.zeros((4, 2), jnp.float32)
    got = ntk.empirical_ntk_fn(lambda w, b: b["x"] @ w, trace_axes=(), batch_size=4)(x1, x2, w)
    expected = np.einsum("ai,bi,kl->abkl", x1["x"], x2["x"], np.eye(2))
    np.testing.assert_allclose(got, expected, **_testing.tolerance(np.float32))


def test_auto_chooses_a_working_implementation():
    g, params, x1, x2 = _setup(jnp.float32)
    ntk_fn = ntk.empirical_ntk_fn(g, implementation=ntk.NtkImplementation.AUTO, batch_size=4)
    got = ntk_fn(x1, x2, params)
    assert ntk.auto_implementation(g, x1, x2, params, batch_size=4) in IMPLEMENTATIONS
    expected = np.einsum("abkk->ab", _testing.hand_ntk(g, params, x1, x2)) / 3
    np.testing.assert_allclose(got, expected, **_testing.tolerance(np.float32))


def test_memory_check_raises_with_advice():
    g, params, x1, _ = _setup(jnp.float32)
    ntk_fn = ntk.empirical_ntk_fn(g, batch_size=4, memory_limit_bytes=100)
    with pytest.raises(ntk.KernelMemoryError, match="batch_size=1"):
        ntk_fn(x1, None, params)


def test_cache_roundtrip_and_key(tmp_path):
    g, params, x1, x2 = _setup(jnp.float32)
    calls = []

    def counted(p, b):
        calls.append(1)
        return g(p, b)

    info = ntk.ModelInfo(fingerprint="g, counted")  # it closes over a growing list: name it

    ntk_fn = ntk.empirical_ntk_fn(counted, batch_size=8, cache_dir=tmp_path, model_info=info)
    first = ntk_fn(x1, x2, params)
    n_calls = len(calls)
    assert len(list(tmp_path.glob("ntk-*.npy"))) == 1
    np.testing.assert_array_equal(ntk_fn(x1, x2, params), first)
    assert len(calls) == n_calls  # served from disk, f not traced again
    params2 = jax.tree.map(lambda a: a * 2.0, params)  # other params: other entry
    assert not np.allclose(ntk_fn(x1, x2, params2), first)
    assert len(list(tmp_path.glob("ntk-*.npy"))) == 2


def test_errors():
    g, params, x1, x2 = _setup(jnp.float32)
    with pytest.raises(ValueError, match="leading size"):
        ntk.empirical_ntk_fn(g)({"x": x1["x"], "ids": x2["ids"]}, None, params)
    with pytest.raises(ValueError, match="x2=None"):
        ntk.empirical_ntk_fn(g, diagonal_axes=(0,))(x1, x2, params)
    with pytest.raises(ValueError, match=r"shape \[N, K\]; got shape \(7,\)"):
        ntk.empirical_ntk_fn(lambda p, b: g(p, b)[:, 0])(x1, None, params)
    with pytest.raises(ValueError, match=r"shape \[N, K\]; got shape \(1,\)"):  # one example
        ntk.empirical_ntk_fn(lambda p, b: g(p, b)[:, 0], vmap_axes=0)(x1, None, params)
    with pytest.raises(ValueError, match="implementation"):
        ntk.empirical_ntk_fn(g, implementation=7)


def test_kernel_matrix_layout():
    k = np.arange(2 * 3 * 2 * 2, dtype=float).reshape(2, 3, 2, 2)
    m = ntk.kernel_matrix(k)
    assert m.shape == (4, 6)
    assert m[1 * 2 + 1, 2 * 2 + 0] == k[1, 2, 1, 0]


def test_auto_implementation_is_returned_not_attached():
    """The AUTO choice is data (``ntk.auto_implementation``), and the kernel with the chosen
    implementation is AUTO's kernel."""
    g, params, x1, x2 = _setup(jnp.float32)
    chosen = ntk.auto_implementation(g, x1, x2, params, batch_size=4)
    assert chosen in IMPLEMENTATIONS
    auto = ntk.empirical_ntk_fn(g, implementation=ntk.NtkImplementation.AUTO, batch_size=4)
    assert not hasattr(auto, "chosen_implementation")
    explicit = ntk.empirical_ntk_fn(g, implementation=chosen, batch_size=4)
    np.testing.assert_array_equal(auto(x1, x2, params), explicit(x1, x2, params))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(trace_axes=(2,)), r"trace_axes=\(2,\) has axis 2, out of range.*use -1"),
        (dict(trace_axes=(-1,), diagonal_axes=(-1,)), "overlap.*drop it from one of them"),
        (dict(trace_axes=(0,)), "traces the batch axis"),
        (dict(batch_size=0), "batch_size must be an int >= 1"),
        (dict(implementation=7), "implementation=7 is not one of.*JACOBIAN_CONTRACTION"),
    ],
)
def test_bad_options_are_config_errors_naming_the_fix(options, message):
    g, *_ = _setup(jnp.float32)
    with pytest.raises(ConfigError, match=message):
        ntk.empirical_ntk_fn(g, **options)


def test_bad_inputs_are_config_errors():
    g, params, x1, x2 = _setup(jnp.float32)
    with pytest.raises(ConfigError, match="pass x2=None"):
        ntk.empirical_ntk_fn(g, diagonal_axes=(0,))(x1, x2, params)
    with pytest.raises(ConfigError, match=r"got shape \(2, 3, 4\).*without diagonal_axes"):
        ntk.kernel_matrix(np.zeros((2, 3, 4)))


def test_kernel_memory_error_is_a_user_error_on_one_line():
    """The CLI shows a UserError as one ``error:`` line: the refusal and its fix."""
    g, params, x1, _ = _setup(jnp.float32)
    with pytest.raises(ntk.KernelMemoryError) as err:
        ntk.empirical_ntk_fn(g, batch_size=4, memory_limit_bytes=100)(x1, None, params)
    assert isinstance(err.value, UserError) and isinstance(err.value, MemoryError)
    line = user_message(err.value)
    assert "\n" not in line and "more than the" in line and "use " in line.lower()  # the fix


def test_model_info_travels_as_an_argument_not_on_f(tmp_path):
    """A wrapped f (jit, lambda) keeps what model_info says: the fingerprint names the cache
    entry whatever function object computes it."""
    g, params, x1, x2 = _setup(jnp.float32)
    info = ntk.ModelInfo(fingerprint="test: the MLP g")
    first = ntk.empirical_ntk_fn(g, cache_dir=tmp_path, model_info=info)(x1, x2, params)
    wrapped = jax.jit(lambda p, b: g(p, b))
    again = ntk.empirical_ntk_fn(wrapped, cache_dir=tmp_path, model_info=info)(x1, x2, params)
    assert len(list(tmp_path.glob("ntk-*.npy"))) == 1  # the same entry: served from disk
    np.testing.assert_array_equal(first, again)
    ntk.empirical_ntk_fn(wrapped, cache_dir=tmp_path)(x1, x2, params)  # no info: f's own hash
    assert len(list(tmp_path.glob("ntk-*.npy"))) == 2


def test_unhashable_closure_names_model_info_as_the_fix(tmp_path):
    g, params, x1, _ = _setup(jnp.float32)

    class Opaque:  # no content to hash: its repr holds an address
        pass

    thing = Opaque()

    def f(p, b):
        return g(p, b) if thing is not None else None

    with pytest.raises(ConfigError, match=r"model_info=ntk.ModelInfo\(fingerprint="):
        ntk.empirical_ntk_fn(f, cache_dir=tmp_path)(x1, None, params)
