"""What an output or model function can do, declared as data beside the function.

The functions this library builds (``readout.make_output_fn``, ``trainable.make_model_fn``,
``lora.with_member_factors``) are :class:`Declared`: the function and its :class:`Capabilities`,
both fields of one frozen value. Whoever needs a capability (packed training in
:mod:`lora_jax.programs`, eNTK compaction and padding cuts in ``ntk``) reads it with
:func:`capabilities_of`. A plain function, or one wrapped in a ``lambda``, ``functools.partial``
or ``jax.jit``, declares nothing, which is always safe: packed batches are refused with an error
that says how to declare them, and ``ntk`` keeps dense tables and uncut blocks. To keep a
wrapped function's capabilities, declare them again: ``Declared(wrapper, capabilities_of(fn))``.

>>> from lora_jax.capabilities import Capabilities, Declared, capabilities_of
>>> f = Declared(lambda params, batch, rng=None: batch, Capabilities(packs_rows=True))
>>> capabilities_of(f).packs_rows, capabilities_of(lambda *a: 0).packs_rows
(True, False)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple


class Capabilities(NamedTuple):
    """What a function's callers may exploit; the default assumes nothing."""

    # It reads packed batches (lora_jax.packing) and gives each row the padded batch's outputs.
    packs_rows: bool = False
    # Trailing padding (masked tokens after a row's last real one) does not change the outputs.
    ignores_padding: bool = False
    # The word-embedding rows it reads besides the input ids (e.g. the label words of a tied
    # readout); None: unknown, so no embedding table may be compacted to the rows a batch reads.
    embedding_rows: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Declared:
    """A function with its :class:`Capabilities`; calls go to ``fn``.

    Frozen and hashable (``fn`` by identity), so a program cache may key on it.
    """

    fn: Callable[..., Any]
    capabilities: Capabilities = Capabilities()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def capabilities_of(fn: Callable[..., Any]) -> Capabilities:
    """``fn`` 's declared capabilities; ``Capabilities()`` (none) unless it is :class:`Declared`."""
    return fn.capabilities if isinstance(fn, Declared) else Capabilities()
