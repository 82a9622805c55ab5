"""Embedding tables compacted to the rows a kernel block reads: the all-weights eNTK, exactly.

The word-embedding table is half of a small encoder's weights (MiniLM-L6: 11.7M of 22.7M), yet
an example's outputs depend only on the rows of the tokens it holds (and the label words a tied
readout reads). So in the eNTK block of ``x1`` x ``x2`` the table's part is a sum over the rows
both read, ``sum_v <df(x1)/dW_v, df(x2)/dW_v>``: differentiating a table of only the rows that
``x1`` or ``x2`` read gives the same kernel, without the dense ``[V, H]`` Jacobian per output
(30,522 x 384 floats, mostly zeros) nor its share of the contraction. The position table is cut
the same way to the positions a sequence of length T can read.

The compacted table is ``{'embedding': [U, H], 'rows': [U]}`` (sorted ids; read by
:func:`lora_jax.models.embed`, which gives NaN for an id not in ``rows``, so a row left out
cannot pass unnoticed). ``rows`` travels in the batch (one copy per example, so that vmapping
over examples works) and is put back into the parameters inside the differentiated function.

Only functions whose :class:`ntk.ModelInfo` names the rows they read besides their input ids
are compacted (``embedding_rows``: set by :func:`ntk.kernel_model` from the ``embedding_rows``
of :func:`lora_jax.readout.make_output_fn` for this library's encoders); others keep dense
tables.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lora_jax import params as params_lib

PyTree = Any

__all__ = [
    "ROWS_PREFIX",
    "ROW_BUCKET",
    "compact_block",
    "compact_fn",
    "compactable_tables",
    "kept_rows",
]

WORD_TABLE = r"(^|\.)embeddings\.word_embeddings\.embedding$"
POSITION_TABLE = r"(^|\.)embeddings\.position_embeddings\.embedding$"
ROW_BUCKET = 512  # compacted word tables have a multiple of this many rows: few compilations
ROWS_PREFIX = "__ntk_rows__:"  # batch-key prefix of a table's rows


def compactable_tables(embedding_rows: np.ndarray | None, params: PyTree) -> tuple[str, ...]:
    """Dotted paths of the embedding tables in ``params`` that a kernel may compact.

    Empty unless ``embedding_rows`` (the rows the model reads besides its input ids,
    :class:`ntk.ModelInfo`) is given and ``params`` is a nested dict holding a word or
    position table.
    """
    if embedding_rows is None or not isinstance(params, dict):
        return ()
    paths = params_lib.flatten(params)
    return tuple(p for p in paths if re.search(WORD_TABLE, p) or re.search(POSITION_TABLE, p))


def kept_rows(path: str, table_rows: int, distinct_ids: int, sequence_length: int) -> int:
    """Rows the compacted table ``path`` keeps (of ``table_rows``) for blocks that read
    ``distinct_ids`` distinct word ids (the model's extra rows included) in sequences of
    ``sequence_length`` tokens: what :func:`compact_block` keeps, given counts instead of ids
    (planning a kernel ahead, :func:`ntk.planning.kernel_programs`)."""
    if re.search(POSITION_TABLE, path):
        # BERT reads positions 0..T-1; RoBERTa padding_idx + 1..T, padding_idx = 1.
        return min(table_rows, sequence_length + 2)
    size = -(-distinct_ids // ROW_BUCKET) * ROW_BUCKET
    return min(size, table_rows)  # all rows when nothing is gained


def _rows_of(path: str, table_rows: int, blocks: Sequence[PyTree], extra: np.ndarray) -> np.ndarray:
    """Sorted ids of the rows of table ``path`` that ``blocks`` read, padded to a fixed size."""
    seq = max(np.shape(b["input_ids"])[1] for b in blocks)
    if re.search(POSITION_TABLE, path):
        return np.arange(kept_rows(path, table_rows, 0, seq), dtype=np.int32)
    ids = np.unique(np.concatenate([np.ravel(b["input_ids"]) for b in blocks] + [np.ravel(extra)]))
    size = kept_rows(path, table_rows, len(ids), seq)
    if size >= table_rows:  # nothing to gain: all rows, in order
        return np.arange(table_rows, dtype=np.int32)
    pad = table_rows + np.arange(size - len(ids))  # sentinels above every id: never read
    return np.concatenate([ids, pad]).astype(np.int32)


def compact_block(
    embedding_rows: np.ndarray, params: PyTree, blocks: Sequence[PyTree], paths: Sequence[str]
) -> tuple[PyTree, list[PyTree]]:
    """Params with tables ``paths`` cut to the rows ``blocks`` read, and the blocks with rows.

    ``embedding_rows``: the rows the model ``f`` reads besides its input ids.

    Returns ``(params_c, blocks_c)``: ``compact_fn(f, paths)(params_c, block_c)`` equals
    ``f(params, block)`` for each block, and its eNTK over ``params_c`` equals ``f`` 's over
    ``params`` (rows outside the compacted table have zero derivative for these blocks).
    """
    extra = np.asarray(embedding_rows, np.int32)
    flat = params_lib.flatten(params)
    blocks_c = [dict(b) for b in blocks]
    for path in paths:
        table = np.asarray(flat[path])  # on the host: no small programs to compile
        rows = _rows_of(path, table.shape[0], blocks, extra)
        real = rows < table.shape[0]
        flat[path] = table[np.minimum(rows, table.shape[0] - 1)] * real[:, None].astype(table.dtype)
        for b in blocks_c:
            n = np.shape(b["input_ids"])[0]
            b[ROWS_PREFIX + path] = np.broadcast_to(rows, (n, len(rows)))  # (N, U)
    return params_lib.unflatten(flat), blocks_c


def compact_fn(f: Callable, paths: Sequence[str]) -> Callable:
    """``f_c(params_c, batch_c)``: ``f`` on the params and blocks of :func:`compact_block`."""
    paths = tuple(paths)

    def f_c(params_c, batch):
        batch = dict(batch)
        flat = params_lib.flatten(params_c)
        for path in paths:
            rows = batch.pop(ROWS_PREFIX + path)  # (N, U), equal rows (N = 1 when vmapped)
            flat[path.rsplit(".", 1)[0] + ".rows"] = rows[0]
        return f(params_lib.unflatten(flat), batch)

    return f_c
