"""Command-line flags derived from a config dataclass: one ``--flag`` per field, typed by it.

A field added to :class:`experiments.config.ExperimentConfig` gets its flag, its type and its
help text (from the class docstring's ``Attributes:`` section) with no change here, as long as
its type is one of: ``bool`` (``--x/--no-x``), ``int``, ``float``, ``str``, a ``StrEnum``
(choices), ``tuple[T, ...]`` of those (``nargs='+'``), or any of these ``| None``. A field of
another type is a bug of the config, reported as a ``TypeError`` when the parser is built.
A field's ``metadata`` may rename its flag (``{"flag": "--task-file"}``) and make a tuple flag
repeatable (``{"repeatable": True}``: ``--task-file a.json --task-file b.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import re
import sys
import types
import typing
from typing import Any

__all__ = ["add_dataclass_arguments", "field_docs", "flag_name", "parse_config", "run_command"]

_SCALARS = (int, float, str)


def flag_name(field_name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + field_name.replace("_", "-")


def field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from the ``Attributes:`` section of ``cls``'s docstring."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    section = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    current, indent = None, 0
    for line in section.splitlines():
        depth = len(line) - len(line.lstrip())
        entry = re.match(r"^\s+(\w+): (.*)$", line)
        if entry and entry.group(1) in names and (current is None or depth <= indent):
            current, indent = entry.group(1), depth
            docs[current] = entry.group(2).strip()
        elif current and line.strip() and depth > indent:
            docs[current] += " " + line.strip()
        else:
            current = None
    return docs


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _scalar_kwargs(tp: Any) -> dict[str, Any] | None:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"type": str, "choices": [m.value for m in tp]}
    if tp in _SCALARS:
        return {"type": tp}
    return None


def _argument_kwargs(cls: type, name: str, tp: Any) -> dict[str, Any]:
    tp = _strip_optional(tp)
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and (kw := _scalar_kwargs(args[0])):
            return {"nargs": "+", **kw}
    elif kw := _scalar_kwargs(tp):
        return kw
    raise TypeError(
        f"{cls.__name__}.{name} has type {tp!r}, which has no command-line form; use bool, int, "
        "float, str, a StrEnum, or tuple[T, ...] of those (optionally | None)."
    )


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one flag per field of the dataclass ``cls``; every flag defaults to None (not given).

    Values parse to the field's type (tuples come back as lists; the caller converts them).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        kwargs = _argument_kwargs(cls, field.name, hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else None
        if isinstance(default, enum.Enum):
            default = default.value
        elif isinstance(default, tuple):
            default = " ".join(map(str, default))
        help_text = f"{docs.get(field.name, '')} (default config: {default})".strip()
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if field.metadata.get("repeatable"):
            kwargs["action"] = "extend"  # each use adds to the list
        flag = field.metadata.get("flag", flag_name(field.name))
        parser.add_argument(flag, dest=field.name, default=None, help=help_text, **kwargs)


def parse_config(
    cls: type,
    argv: list[str] | None,
    *,
    prog: str,
    description: str | None,
    lists: dict[str, dict[str, Any]],
) -> Any:
    """A theory command's config ``cls`` from its command line, one flag per field.

    ``lists`` gives the argparse keywords of the fields that take several values (e.g.
    ``{"seeds": {"nargs": "+", "type": int}}``; they become tuples); any other field's flag
    takes one value of its default's type (``int``, ``float``, else ``str``). A config that
    refuses the values is a usage error (one line).
    """
    from lora_jax.errors import ConfigError, user_message

    parser = argparse.ArgumentParser(prog=prog, description=description)
    for field in dataclasses.fields(cls):
        if field.name in lists:
            parser.add_argument(flag_name(field.name), **lists[field.name])
            continue
        kind = {int: int, float: float}.get(type(field.default), str)
        parser.add_argument(flag_name(field.name), type=kind)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    except ConfigError as err:
        parser.error(user_message(err))


def run_command(cfg: Any, run: Any, markdown: Any, footer: str = "") -> None:
    """Runs a theory command: ``run(cfg)``, its ``markdown(results)`` on stdout and the wall
    time on stderr; bad input (``UserError``) is one line, a bug keeps its traceback."""
    from lora_jax.errors import UserError, user_message

    try:
        results = run(cfg)
    except UserError as err:
        raise SystemExit(f"error: {user_message(err)}") from err
    print(markdown(results))
    print(f"{footer.format(**results)}({results['seconds']:.0f} s)", file=sys.stderr)
