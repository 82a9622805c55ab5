"""Dotted paths over nested-dict parameter pytrees: flatten, select by regex, split and join.

Parameters throughout lora_jax are plain nested dicts whose keys mirror Hugging Face module
names (``roberta.encoder.layer.0.attention.self.query.kernel``). These helpers give every
leaf its dotted path, so that training subsets ("train only the classifier"), LoRA targeting
and NTK parameter subsets all speak the same language.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from lora_jax.errors import ConfigError

PyTree = Any


def flatten(tree: Mapping) -> dict[str, Any]:
    """Flattens a nested dict into ``{dotted_path: leaf}`` (layer-list int keys become digits)."""
    flat: dict[str, Any] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for key, child in node.items():
                visit(child, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = node

    visit(tree, "")
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Inverse of :func:`flatten`; all-digit path components become int keys."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree


def select(tree: Mapping, pattern: str | Callable[[str], bool]) -> list[str]:
    """Dotted leaf paths chosen by ``pattern``: a regex searched in the path, or a predicate.

    Raises:
      ValueError: if nothing is selected; the message lists some real paths to aim at.
    """
    paths = list(flatten(tree))
    if callable(pattern):
        chosen = [p for p in paths if pattern(p)]
    else:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"Parameter pattern {pattern!r} is not a valid regex: {err}") from err
        chosen = [p for p in paths if regex.search(p)]
    if not chosen:
        shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
        raise ConfigError(
            f"Parameter pattern {pattern!r} selects no parameter. Paths look like: {shown}. "
            "Use a regex that matches some of them (it is searched in the dotted path)."
        )
    return chosen


def partition(tree: Mapping, pattern: str | Callable[[str], bool]) -> tuple[dict, dict]:
    """Splits ``tree`` into ``(selected, rest)`` nested dicts; :func:`combine` joins them back."""
    chosen = set(select(tree, pattern))
    flat = flatten(tree)
    selected = {p: v for p, v in flat.items() if p in chosen}
    rest = {p: v for p, v in flat.items() if p not in chosen}
    return unflatten(selected), unflatten(rest)


def combine(*trees: Mapping) -> dict:
    """Merges nested dicts with disjoint leaves (later trees win on a clash)."""
    flat: dict[str, Any] = {}
    for tree in trees:
        flat.update(flatten(tree))
    return unflatten(flat)
