"""Padding-free batches: the rows of a batch packed end to end into one sequence.

Few-shot rows vary in length (TREC's prompts hold 15 tokens on average, padded to 40 in a
batch), and every padded token costs as much compute as a real one. :func:`pack` lays the real
tokens of a ``[B, T]`` batch end to end in one ``[1, length]`` row, marks which row each token
came from (``segment_ids``, 1..B; 0 for the tail) and where each padded slot's token went
(``token_index``). The encoder (``lora_jax.models.forward``) then runs its dense layers, norms
and activations on the packed tokens only, and attention on the padded ``[B, T]`` form
(:class:`PackedLayout`), with positions restarting at each row: every row's outputs are those
of the padded batch, with the padding left out of the GEMMs (as FlashAttention's unpadded
variable-length layout, or Hugging Face's ``DataCollatorWithFlattening``, for a compiled,
static-shape step). Attention keeps its padded cost, ``B T^2``, instead of ``length^2``.

``length`` must be static. :func:`packed_length` finds the smallest one that holds every batch
a run draws: the training loop's batch schedule is a pure function of the seed, so the host
knows each step's rows before training starts (``programs.batch_schedule``).

Example::

    batch = {"input_ids": ids, "attention_mask": mask, "mask_pos": pos, "labels": y}  # [B, T]
    packed = pack(batch, 64)  # input_ids / attention_mask / segment_ids / token_type_ids
                              # [1, 64]; token_index [B, T]; mask_pos, row_starts, labels [B]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import rows
from lora_jax.errors import ConfigError

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")  # the (N, T) arrays of a batch

__all__ = ["PackedLayout", "block_length", "pack", "packed_length", "segment_positions"]


class PackedLayout(NamedTuple):
    """Where the packed tokens of a batch sit in its padded ``[B, T]`` form.

    The encoder runs its GEMMs, norms and activations on the packed tokens, and attention on
    the padded form (``to_rows`` / ``to_packed``): attention then costs what it costs on the
    padded batch (``B T^2``, not ``P^2`` for one long row), and no token sees another row.
    """

    segment_ids: jax.Array  # (1, P): the row (1..B) of each packed token; 0 on the tail
    token_index: jax.Array  # (B, T): packed position of row b's token t; P for padding

    def key_mask(self) -> jax.Array:
        """``(B, T)`` bool: True at real tokens."""
        return self.token_index < self.segment_ids.shape[-1]

    def to_rows(self, a: jax.Array) -> jax.Array:
        """``(1, P, ...)`` -> ``(B, T, ...)``; padding reads the last packed slot (masked)."""
        return jnp.take(a[0], self.token_index, axis=0, mode="clip")

    def to_packed(self, a: jax.Array) -> jax.Array:
        """``(B, T, ...)`` -> ``(1, P, ...)``; the tail reads row 0's first token."""
        B, T = self.token_index.shape
        seg = self.segment_ids[0]
        flat = jnp.where(seg > 0, (seg - 1) * T + segment_positions(seg), 0)  # (P,)
        return jnp.take(a.reshape((B * T,) + a.shape[2:]), flat, axis=0)[None]


def pack(batch: Mapping[str, jax.Array], length: int) -> dict[str, jax.Array]:
    """The rows of ``batch`` laid end to end in one row of ``length`` tokens (traceable).

    Args:
      batch: ``input_ids`` and ``attention_mask`` ``[B, T]`` (real tokens first in each row,
        then padding, as :func:`lora_jax.tasks.encode` writes them), optionally
        ``token_type_ids`` ``[B, T]`` and ``mask_pos`` ``[B]``; other arrays (``labels``) are
        per row and kept as they are.
      length: static length of the packed row; at least the batch's number of real tokens
        (tokens past it are dropped: size it with :func:`packed_length`).

    Returns:
      ``input_ids``, ``attention_mask``, ``token_type_ids`` and ``segment_ids`` ``[1, length]``
      (``segment_ids`` 1..B where row b's tokens went, 0 on the unused tail), ``token_index``
      ``[B, T]`` (where row b's token t went; ``length`` for padding), ``row_starts`` ``[B]``
      (where each row begins), ``mask_pos`` ``[B]`` moved to packed positions, and the other
      arrays of ``batch``.
    """
    mask = jnp.asarray(batch["attention_mask"])
    B, T = mask.shape
    lengths = jnp.sum(mask > 0, axis=1, dtype=jnp.int32)  # (B,)
    starts = jnp.cumsum(lengths) - lengths  # (B,)
    t = jnp.arange(T, dtype=jnp.int32)
    dest = jnp.where(t[None, :] < lengths[:, None], starts[:, None] + t[None, :], length)  # (B, T)

    def scatter(values: jax.Array) -> jax.Array:
        out = jnp.zeros((length,), values.dtype).at[dest.ravel()].set(values.ravel(), mode="drop")
        return out[None, :]  # (1, length)

    types = batch.get("token_type_ids")
    rows = jnp.broadcast_to(jnp.arange(1, B + 1, dtype=jnp.int32)[:, None], (B, T))
    out = {k: v for k, v in batch.items() if k not in TOKEN_KEYS}
    out.update(
        token_index=dest,
        input_ids=scatter(jnp.asarray(batch["input_ids"])),
        attention_mask=scatter((mask > 0).astype(jnp.int32)),
        token_type_ids=scatter(jnp.zeros((B, T), jnp.int32) if types is None else types),
        segment_ids=scatter(rows),
        row_starts=starts,
    )
    if "mask_pos" in batch:
        out["mask_pos"] = starts + jnp.asarray(batch["mask_pos"], jnp.int32)
    return out


def packed_length(attention_mask: np.ndarray, schedule: np.ndarray, multiple: int = 8) -> int:
    """The packed length that holds every batch of ``schedule``, rounded up to ``multiple``.

    Args:
      attention_mask: ``[N, T]`` of the training set (or ``[n, N, T]``: members of a sweep).
      schedule: ``[steps, B]`` row indices of each step's batch (or ``[n, steps, B]``), as
        :func:`lora_jax.programs.batch_schedule` gives them.
      multiple: round up to this (fewer distinct compiled shapes); never past ``B * T``.

    Returns:
      The most real tokens any scheduled batch holds, rounded up.
    """
    mask = np.asarray(attention_mask)
    schedule = np.asarray(schedule)
    if mask.ndim == 2:
        mask, schedule = mask[None], schedule[None]
    if schedule.shape[0] != mask.shape[0]:
        raise ConfigError(
            f"packed_length got {mask.shape[0]} training sets and {schedule.shape[0]} schedules; "
            "pass one schedule per member."
        )
    lengths = (mask > 0).sum(-1)  # (n, N)
    totals = np.take_along_axis(lengths, schedule.reshape(len(lengths), -1), axis=1)
    most = int(totals.reshape(schedule.shape).sum(-1).max())  # over members and steps
    return min(-(-most // multiple) * multiple, schedule.shape[-1] * mask.shape[-1])


def block_length(attention_mask: np.ndarray, batch_size: int, multiple: int = 8) -> int:
    """The packed length that holds every block :func:`lora_jax.rows.map_rows` cuts.

    ``attention_mask`` ``[N, T]`` (or ``[n, N, T]``: members, each cut on its own), blocks of
    :func:`lora_jax.rows.even_blocks` ``(N, batch_size)`` rows (the last one padded by repeating
    row N - 1, as ``map_rows`` does); rounded up to ``multiple``, never past ``rows * T``.
    """
    mask = np.asarray(attention_mask) > 0
    n, width = mask.shape[-2:]
    num_blocks, size = rows.even_blocks(n, batch_size)
    idx = np.minimum(np.arange(num_blocks * size), n - 1)
    totals = mask.sum(-1)[..., idx].reshape(mask.shape[:-2] + (num_blocks, size)).sum(-1)
    return min(-(-int(totals.max()) // multiple) * multiple, size * width)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its segment: ``[..., T]`` ids -> ``[..., T]`` 0, 1, 2, ...

    Segments are runs of equal ids (as :func:`pack` writes them); the count restarts at each.
    """
    T = segment_ids.shape[-1]
    t = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids.shape)
    previous = jnp.concatenate([jnp.full_like(segment_ids[..., :1], -1), segment_ids[..., :-1]], -1)
    begins = jnp.where(segment_ids != previous, t, 0)
    return t - jax.lax.cummax(begins, axis=segment_ids.ndim - 1)
