"""ntk's public API: one option vocabulary across entry points, no names shared with lora_jax."""

import importlib
import inspect
import pkgutil

import pytest

import lora_jax
import ntk
from lora_jax.errors import ConfigError
from lora_jax.losses import Loss

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _entry_points():
    return {
        name: getattr(ntk, name) for name in ntk.__all__ if inspect.isfunction(getattr(ntk, name))
    }


def _ntk_modules():
    for info in pkgutil.walk_packages(ntk.__path__, "ntk."):
        if not info.name.startswith("ntk.theory"):  # the paper's maths: its own vocabulary
            yield importlib.import_module(info.name)


def test_all_is_sorted_and_importable():
    assert ntk.__all__ == sorted(ntk.__all__)
    for name in ntk.__all__:
        assert getattr(ntk, name) is not None


#: Options shared by several entry points: one annotation and one default each. (``diag_reg``
#: is one name with a per-solver scale and default, see ntk.solvers; ``vmap_axes`` defaults to
#: nt's None except in ntk_regime_report, whose LoRA encoders are per-example: 0.)
SHARED = (
    "trace_axes",
    "diagonal_axes",
    "implementation",
    "dtype",
    "memory_limit_bytes",
    "cache_dir",
    "progress",
    "model_info",
    "learning_rate",
    "fx_train_0",
    "fx_test_0",
    "eval_batch_size",
    "loss",
)


def test_one_name_type_and_default_per_option_across_entry_points():
    """neural-tangents' names and defaults (``trace_axes=(-1,)``, ``diagonal_axes=()``), one
    regulariser name ``diag_reg``, ``loss`` a ``Loss``; each shared option typed alike."""
    seen: dict[str, set] = {}
    for name, fn in _entry_points().items():
        for p in inspect.signature(fn).parameters.values():
            assert p.name not in ("reg", "c", "ridge", "l2"), f"{name}({p.name}=): use diag_reg"
            if p.name in SHARED:
                seen.setdefault(p.name, set()).add((str(p.annotation), repr(p.default)))
    assert seen["trace_axes"] == {("Axes", "(-1,)")}
    assert seen["diagonal_axes"] == {("Axes", "()")}
    assert seen["loss"] == {("Loss | str", repr(Loss.CE))}
    for option in SHARED:
        if option in seen:
            assert len(seen[option]) == 1, f"{option}: {seen[option]}"
    with_reg = [
        n for n, fn in _entry_points().items() if "diag_reg" in inspect.signature(fn).parameters
    ]
    assert set(with_reg) >= {"mse_predict", "kernel_logistic_regression", "kernel_svm"}


@pytest.mark.parametrize(
    ("enum", "values"),
    [
        (ntk.KernelSolver, ("mse", "logistic")),
        (ntk.Linearization, ("weights", "adapters")),
    ],
)
def test_choice_enums_accept_their_old_strings(enum, values):
    assert [enum(v).value for v in values] == list(values)
    assert all(enum(v) == v for v in values)  # StrEnum: CLI / config strings compare equal


def test_enum_options_refuse_unknown_values_with_the_allowed_set():
    with pytest.raises(ConfigError, match=r"kernel_solver='svm'.*'mse', 'logistic'"):
        ntk.ntk_regime_report(None, None, None, None, None, {}, {}, kernel_solver="svm")
    with pytest.raises(ConfigError, match=r"linearization='input'.*'weights', 'adapters'"):
        ntk.ntk_regime_report(None, None, None, None, None, {}, {}, linearization="input")


def test_no_public_name_shared_with_lora_jax():
    """No two public objects with one name and different meanings (ntk.ModelFn vs
    lora_jax.train.ModelFn, ntk._padding.by_length vs lora_jax.rows.by_length, ...)."""
    ours = {}
    for module in _ntk_modules():
        for name in getattr(module, "__all__", ()):
            ours[name] = (module.__name__, getattr(module, name))
    clashes = []
    for info in pkgutil.walk_packages(lora_jax.__path__, "lora_jax."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if name.startswith("_") or inspect.ismodule(value):  # submodules: not objects
                continue
            if name in ours and value is not ours[name][1]:
                clashes.append(f"{ours[name][0]}.{name} vs {info.name}.{name}")
    assert not clashes
