"""The one place that imports neural-tangents: restores the jax names it needs, then imports it.

neural-tangents 0.6.5 is the last release. It imports jax internals that newer jax removed
(``jax.core.Jaxpr`` & co., the module ``jax.util``, ``jax.interpreters.ad.zeros_like_p``), and
its ``neural_tangents.experimental`` package imports tensorflow, which this project does not
install. Before ``import neural_tangents`` this module

* registers an empty ``neural_tangents.experimental`` module (the tensorflow eNTK port; unused),
* adds ``jax.core.{Jaxpr, JaxprEqn, Literal, Var, Primitive}`` from ``jax.extend.core``,
* registers a ``jax.util`` module with ``safe_map`` / ``safe_zip``,
* adds ``jax.interpreters.ad.zeros_like_p`` (from ``jax._src.ad_util``), and for
  ``STRUCTURED_DERIVATIVES`` also ``ad.source_info_util``, ``ad.config`` and a placeholder
  class ``jax.core.DShapedArray`` (dynamic shapes are gone, so no value is ever of that type).

It also silences the four deprecation warnings nt triggers on each kernel (by message).
Only missing attributes are set, so on a jax that still has them nothing changes. Everything
else in ``ntk`` imports neural-tangents as ``from ntk._compat import nt``.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings

import jax
import jax.core
import jax.extend.core
import jax.interpreters.ad
from jax._src import ad_util as _ad_util
from jax._src import config as _config
from jax._src import source_info_util as _source_info_util
from jax._src import util as _util

__all__ = ["nt", "patched_names"]

#: Names this module added, as ``"module.attribute"`` strings (empty on an old jax).
patched_names: list[str] = []


def _set_missing(module: types.ModuleType, name: str, value: object) -> None:
    if not hasattr(module, name):
        setattr(module, name, value)
        if f"{module.__name__}.{name}" not in patched_names:
            patched_names.append(f"{module.__name__}.{name}")


class _DShapedArrayPlaceholder:
    """Stands in for the removed ``jax.core.DShapedArray``: ``type(a) is`` it is always False."""


def _patch() -> None:
    if "neural_tangents.experimental" not in sys.modules:
        stub = types.ModuleType(
            "neural_tangents.experimental",
            doc="Stub: the tensorflow eNTK port is not available (tensorflow is not installed).",
        )
        sys.modules["neural_tangents.experimental"] = stub
        patched_names.append("neural_tangents.experimental")

    for name in ("Jaxpr", "JaxprEqn", "Literal", "Var", "Primitive"):
        _set_missing(jax.core, name, getattr(jax.extend.core, name))
    _set_missing(jax.core, "DShapedArray", _DShapedArrayPlaceholder)

    if "jax.util" not in sys.modules:
        try:
            importlib.import_module("jax.util")
        except ImportError:
            util = types.ModuleType("jax.util", doc="Compat shim for neural-tangents.")
            util.safe_map = _util.safe_map
            util.safe_zip = _util.safe_zip
            sys.modules["jax.util"] = util
            patched_names.append("jax.util")
    _set_missing(jax, "util", sys.modules["jax.util"])
    _set_missing(sys.modules["jax.util"], "safe_map", _util.safe_map)
    _set_missing(sys.modules["jax.util"], "safe_zip", _util.safe_zip)

    ad = jax.interpreters.ad
    _set_missing(ad, "zeros_like_p", _ad_util.zeros_like_p)
    _set_missing(ad, "source_info_util", _source_info_util)
    _set_missing(ad, "config", _config.config)


def _quiet_known_warnings() -> None:
    """Silences the deprecation warnings nt 0.6.5 triggers on every kernel (not ours to fix)."""
    for message in (
        r"linear_util\.wrap_init is missing a DebugInfo",  # nt's STRUCTURED_DERIVATIVES
        r"jax\.interpreters\.ad\.reducing_transposes is deprecated",
        r"size requires ndarray or scalar arguments",  # nt's FLOP / shape helpers
        r"Implicit conversion of an array to a dtype",  # nt: jnp.dtype(array)
    ):
        warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)


_patch()
_quiet_known_warnings()

import neural_tangents as nt  # noqa: E402
