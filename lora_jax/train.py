"""The optax training loop: one host loop over a job of ``n`` runs (members); a run is a job of one.

The model is any ``model_fn(trainable, frozen, batch, dropout_rng) -> outputs [B, K]``: LoRA
adapters over a frozen base, all weights, only a head, or a linearized model from ``ntk`` all
train through the same loop. Every leaf of a job's :class:`TrainState` has a leading member axis
``[n, ...]`` (:mod:`lora_jax.members`); the compiled chunk of steps is ``jax.vmap`` -ed over it
with the frozen base unbatched, so for a base kernel ``W`` (in, out) XLA runs one
``(n B T, in) @ (in, out)`` GEMM for all members (with the fused LoRA path). Members are
independent: each has its own parameters, learning rate (in its optimizer state,
:mod:`lora_jax.optim`), seed (batch order and dropout), data, and gradient clipping.

Data stays on the device as a dict of ``[N, ...]`` arrays (shared by all members) or one dict per
member; each step gathers its batch by index from a per-epoch permutation derived from the step
counter, so the loop keeps no host-side state and a resumed run sees exactly the batches an
uninterrupted run would. ``eval_every`` steps run as one ``lax.scan`` inside one ``jax.jit``
call; after each chunk the loop evaluates on dev, keeps each member's best parameters, calls the
callbacks (e.g. :func:`write_metrics`) and saves a checkpoint.

Example (a linear classifier standing in for a model):
  >>> import jax.numpy as jnp, numpy as np
  >>> from lora_jax import train
  >>> def model_fn(trainable, frozen, batch, dropout_rng):
  ...     return batch["x"] @ trainable["w"]  # (B, K)
  >>> x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
  >>> data = {"x": x, "labels": (x[:, 0] > 0).astype(np.int32)}
  >>> cfg = train.TrainConfig(steps=20, batch_size=8, learning_rate=0.1, eval_every=10)
  >>> state = train.init_state({"w": jnp.zeros((4, 2))}, train.make_optimizer(cfg), cfg.seed)
  >>> result = train.fit(model_fn, state, {}, data, data, cfg, progress=False)
  >>> [r["step"] for r in result.history], result.best_dev_accuracy > 0.9
  ([10, 20], True)

The same three times as one job, with three learning rates and seeds:
  >>> from lora_jax import members
  >>> states = train.init_states(members.stack([{"w": jnp.zeros((4, 2))}] * 3), cfg,
  ...                            learning_rates=[0.1, 0.2, 0.3], seeds=[0, 1, 2])
  >>> results = train.fit_job(model_fn, states, {}, data, data, cfg, progress=False)
  >>> [r.best_dev_accuracy > 0.9 for r in results]
  [True, True, True]
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from lora_jax import checkpoint, members, packing, rows
from lora_jax import sharding as sharding_lib
from lora_jax.errors import ConfigError
from lora_jax.losses import Loss, get_loss
from lora_jax.optim import Optimizer, Schedule, make_optimizer
from lora_jax.rows import map_rows, num_rows

PyTree = Any
Batch = Mapping[str, jax.Array]
ModelFn = Callable[[PyTree, PyTree, Batch, jax.Array | None], jax.Array]

__all__ = [
    "Evaluation",
    "FitResult",
    "Optimizer",
    "Schedule",
    "TrainConfig",
    "TrainState",
    "batch_indices",
    "batch_schedule",
    "chunk_lengths",
    "evaluate",
    "fit",
    "fit_job",
    "init_state",
    "init_states",
    "job_programs",
    "make_optimizer",
    "make_predict",
    "make_train_chunk",
    "pack_length",
    "write_metrics",
]


def _enum_field(cls: type[enum.Enum], name: str, value: Any) -> enum.Enum:
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)
        raise ConfigError(f"TrainConfig.{name}={value!r} is not one of {allowed}.") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyperparameters of one training run (defaults: LM-BFF-style LoRA fine-tuning).

    Attributes:
      steps: optimizer micro-steps (each on one batch); with ``grad_accum = a`` the optimizer
        updates every ``a`` steps.
      batch_size: examples per step.
      learning_rate: peak learning rate.
      optimizer: ``adamw`` or ``sgd``.
      momentum: SGD momentum (0 = plain gradient descent).
      weight_decay: AdamW decoupled weight decay.
      schedule: ``constant``, ``linear`` or ``cosine`` after ``warmup_steps`` of linear warmup.
      warmup_steps: linear warmup length.
      max_grad_norm: global-norm clipping threshold; None disables clipping.
      grad_accum: number of steps whose gradients are averaged per update.
      loss: ``ce`` or ``mse`` on the K outputs (see :mod:`lora_jax.losses`).
      eval_every: evaluate on dev (and checkpoint) every this many steps, and after the last
        step (any value: with ``steps % eval_every`` left over, the last interval is shorter;
        ``eval_every > steps`` evaluates once, at the end).
      eval_batch_size: batch size for evaluation.
      dropout: whether to run the model's dropout during training.
      seed: seeds batch order and dropout.
    """

    steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 1e-4
    optimizer: Optimizer = Optimizer.ADAMW
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: Schedule = Schedule.CONSTANT
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    grad_accum: int = 1
    loss: Loss = Loss.CE
    eval_every: int = 100
    eval_batch_size: int = 64
    dropout: bool = False
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "optimizer", _enum_field(Optimizer, "optimizer", self.optimizer))
        object.__setattr__(self, "schedule", _enum_field(Schedule, "schedule", self.schedule))
        object.__setattr__(self, "loss", _enum_field(Loss, "loss", self.loss))
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise ConfigError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}.")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(
                f"TrainConfig.warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})."
            )


def chunk_lengths(steps: int, eval_every: int, start: int = 0) -> list[int]:
    """Steps of each compiled chunk from ``start`` to ``steps``: evaluation after each.

    Chunks end at the multiples of ``eval_every`` and at ``steps``, wherever the run starts from
    (so a run resumed from a checkpoint at a chunk end continues on the same schedule).

    >>> chunk_lengths(20, 25), chunk_lengths(60, 25), chunk_lengths(60, 25, start=50)
    ([20], [25, 25, 10], [10])
    """
    ends = [*range(eval_every, steps, eval_every), steps]
    return [e - max(b, start) for b, e in zip([0, *ends], ends, strict=False) if e > start]


# The dropout key of step t is fold_in(fold_in(rng, DROPOUT_TAG), t), disjoint from the batch-order
# keys fold_in(rng, epoch): epochs never reach 2**32 - 1, since the step counter is an int32.
DROPOUT_TAG = 0xFFFFFFFF


def dropout_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """The dropout key (a typed key) of ``step`` for a state's ``rng`` (raw ``uint32[2]``)."""
    base = jax.random.fold_in(jax.random.wrap_key_data(rng), DROPOUT_TAG)
    return jax.random.fold_in(base, step)


class TrainState(NamedTuple):
    """Everything a step reads and writes; a pytree, so it is checkpointed as one."""

    step: jax.Array  # shape=(), int32: micro-steps taken so far.
    trainable: PyTree  # the parameters being optimized (adapters, head, or all weights).
    opt_state: optax.OptState
    rng: jax.Array  # shape=(2,), uint32: base key of batch order and dropout.


class FitResult(NamedTuple):
    """What :func:`fit` returns, and :func:`fit_job` per member (leaves without the member axis)."""

    state: TrainState  # the final state.
    best_trainable: PyTree  # trainable parameters at the best dev evaluation.
    best_step: int
    best_dev_accuracy: float
    history: list[dict]  # one dict per evaluation (the JSONL records).
    test: dict[str, float] | None = None  # accuracy and loss of best_trainable on test_data.


class Evaluation(NamedTuple):
    """What the loop hands its callbacks after each dev evaluation."""

    step: int
    records: list[dict]  # per member: step, train_loss, dev_accuracy, dev_loss.
    improved: list[bool]  # per member: whether this evaluation is its new best.


def init_state(trainable: PyTree, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """Fresh state of one run at step 0 (``optimizer``: :func:`make_optimizer` of its config)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        opt_state=optimizer.init(trainable),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def init_states(
    trainables: PyTree,
    cfg: TrainConfig,
    learning_rates: Sequence[float],
    seeds: Sequence[int],
) -> TrainState:
    """Stacked fresh states of a job: member i gets ``trainables[i]``, ``learning_rates[i]`` and
    ``seeds[i]`` (``cfg.learning_rate`` and ``cfg.seed`` are not used).

    Args:
      trainables: stacked trainable parameters, leaves ``[n, ...]`` (e.g. ``lora.init_stack``).
      cfg: the hyperparameters the members share.
      learning_rates: ``n`` peak learning rates.
      seeds: ``n`` seeds of batch order and dropout (as ``TrainConfig.seed``).
    """
    n = members.count(trainables)
    if not len(learning_rates) == len(seeds) == n:
        raise ConfigError(
            f"init_states got {n} members but {len(learning_rates)} learning rates and "
            f"{len(seeds)} seeds; give one of each per member."
        )
    return members.stack(
        [
            init_state(
                members.member(trainables, i),
                make_optimizer(dataclasses.replace(cfg, learning_rate=lr)),
                seed,
            )
            for i, (lr, seed) in enumerate(zip(learning_rates, seeds, strict=True))
        ]
    )


def batch_indices(rng: jax.Array, step: jax.Array, num_examples: int, batch_size: int):
    """Indices [batch_size] of the batch for ``step``: epoch-wise shuffling without replacement.

    Each epoch is a fresh permutation of the ``num_examples`` indices keyed by the epoch number,
    cut into ``num_examples // batch_size`` batches (a remainder is left out that epoch).
    """
    per_epoch = num_examples // batch_size
    epoch, offset = step // per_epoch, step % per_epoch
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), epoch)
    perm = jax.random.permutation(key, num_examples)
    return jax.lax.dynamic_slice(perm, (offset * batch_size,), (batch_size,))


def batch_schedule(rng: jax.Array, steps: int, num_examples: int, batch_size: int) -> np.ndarray:
    """``[steps, batch_size]`` row indices of every step's batch (:func:`batch_indices`), on the
    host: the batches a run will draw, known before it starts (for :mod:`lora_jax.packing`)."""
    return np.asarray(_draw_batches(rng, jnp.arange(steps), num_examples, batch_size))


_draw_batches = jax.jit(
    jax.vmap(batch_indices, in_axes=(None, 0, None, None)), static_argnums=(2, 3)
)


def check_packs_rows(model_fn: ModelFn) -> None:
    """ConfigError unless ``model_fn`` reads packed batches (sets ``packs_rows``)."""
    if not getattr(model_fn, "packs_rows", False):
        raise ConfigError(
            "packed batches need a model_fn that reads them (model_fn.packs_rows; "
            "make_model_fn over make_output_fn's MLM / TIED / TIED_MEAN readouts of this "
            "library's encoders, DeBERTa excepted, sets it). Train on padded batches "
            "(pack_length=None)."
        )


def pack_length(
    model_fn: ModelFn, rng: jax.Array, steps: int, train_data: Batch, batch_size: int
) -> int:
    """The least packed length (:mod:`lora_jax.packing`) that holds every batch a run of
    ``steps`` with batch-order key ``rng`` (``TrainState.rng``) draws from ``train_data``.

    Pass it (or any larger length) as ``fit`` 's ``pack_length``. ConfigError if ``model_fn``
    does not read packed batches.
    """
    check_packs_rows(model_fn)
    if "attention_mask" not in train_data:
        raise ConfigError("packed batches need token rows: train_data has no 'attention_mask'.")
    n = int(np.shape(train_data["labels"])[0])
    return packing.packed_length(
        np.asarray(train_data["attention_mask"]), batch_schedule(rng, steps, n, batch_size)
    )


_least_pack_length = pack_length  # fit_job's argument of that name shadows it


def _chunk_fn(
    model_fn: ModelFn,
    optimizer: optax.GradientTransformation,
    cfg: TrainConfig,
    constrain_batch: Callable[[Batch], Batch] | None = None,
) -> Callable:
    """The traceable ``chunk(state, frozen, data, length, pack_length)`` of one member."""
    loss_fn = get_loss(cfg.loss)

    def objective(trainable, frozen, batch, dropout_rng):
        outputs = model_fn(trainable, frozen, batch, dropout_rng)
        return loss_fn(outputs, batch["labels"])

    def step(state: TrainState, frozen, data, pack_length):
        num_examples = data["labels"].shape[0]
        idx = batch_indices(state.rng, state.step, num_examples, cfg.batch_size)
        batch = jax.tree.map(lambda x: x[idx], data)
        if pack_length:
            batch = packing.pack(batch, pack_length)
        if constrain_batch is not None:
            batch = constrain_batch(batch)
        dropout_rng = dropout_key(state.rng, state.step) if cfg.dropout else None
        loss, grads = jax.value_and_grad(objective)(state.trainable, frozen, batch, dropout_rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        return TrainState(state.step + 1, trainable, opt_state, state.rng), loss

    def chunk(state, frozen, data, length, pack_length):
        if data["labels"].shape[0] < cfg.batch_size:
            raise ConfigError(
                f"Training set has {data['labels'].shape[0]} examples, fewer than "
                f"batch_size={cfg.batch_size}; lower TrainConfig.batch_size."
            )
        body = lambda carry, _: step(carry, frozen, data, pack_length)  # noqa: E731
        return jax.lax.scan(body, state, None, length=length)

    return chunk


def make_train_chunk(
    model_fn: ModelFn,
    optimizer: optax.GradientTransformation,
    cfg: TrainConfig,
    *,
    mesh: Mesh | None = None,
    rules: sharding_lib.Rules | None = None,
) -> Callable[..., tuple[TrainState, jax.Array]]:
    """Returns jitted ``chunk(state, frozen, data, length=None, pack_length=None) -> (state,
    losses [length])`` of one run (no member axis): the step :func:`fit` vmaps over members.

    ``data`` is the whole training set as a dict of ``[N, ...]`` arrays (with ``labels`` [N]);
    ``frozen`` is passed in (not closed over) so its arrays are not baked into the program.
    ``length`` (static; default ``cfg.eval_every``) is the number of steps. ``pack_length``
    (static): each step's batch packed into one row of that many tokens
    (:func:`lora_jax.packing.pack`; size it with :func:`pack_length`); one device only.

    With a ``mesh``, the program is compiled with in / out shardings from ``rules`` (default
    :func:`lora_jax.sharding.rules_for_mesh`): the state and ``frozen`` by their logical axes,
    ``data`` over the batch axes, and each step's batch constrained to the batch axes.
    """
    on_mesh = _MeshPlan.make(mesh, rules, cfg.batch_size)
    fn = _chunk_fn(model_fn, optimizer, cfg, on_mesh and on_mesh.constrain_batch)

    def chunk(state, frozen, data, length=None, pack_length=None):
        _check_length(pack_length)
        return fn(state, frozen, data, length or cfg.eval_every, pack_length)

    if on_mesh is None:
        return jax.jit(chunk, donate_argnums=0, static_argnames=("length", "pack_length"))

    def constrained(state, frozen, data, length=None):
        state, losses = chunk(state, frozen, data, length)
        return jax.lax.with_sharding_constraint(state, on_mesh.tree(state)), losses

    jitted = jax.jit(constrained, donate_argnums=0, static_argnames="length")

    def on_mesh_chunk(state, frozen, data, length=None, pack_length=None):
        _refuse_packing_on_mesh(pack_length)
        state, frozen, data = on_mesh.place(state, frozen, data)
        return jitted(state, frozen, data, length=length)

    return on_mesh_chunk


def _check_length(pack_length: Any) -> None:
    """A compiled program's ``pack_length`` is a length in tokens (or None), not a switch."""
    if pack_length is None:
        return
    if isinstance(pack_length, bool) or not isinstance(pack_length, int) or pack_length < 1:
        raise ConfigError(
            f"pack_length={pack_length!r}: pack_length is the packed length in tokens (None = "
            "padded batches); size it with train.pack_length (training) or "
            "packing.block_length (prediction), or use the host predict's packed=True."
        )


def _refuse_packing_on_mesh(pack_length: int | None) -> None:
    if pack_length:
        raise ConfigError(
            "Packed batches run on one device (a packed row cannot be split over the batch "
            "axes); train on a mesh with pack_length=None."
        )


class _MeshPlan(NamedTuple):
    """A mesh and its rule table, and the shardings the training programs derive from them."""

    mesh: Mesh
    rules: sharding_lib.Rules

    @classmethod
    def make(cls, mesh: Mesh | None, rules: sharding_lib.Rules | None, batch_size: int | None):
        if mesh is None:
            return None
        rules = sharding_lib.rules_for_mesh(mesh) if rules is None else rules
        sharding_lib.check_rules(rules, mesh)
        ways = sharding_lib.batch_ways(mesh, rules)
        if batch_size is not None and batch_size % ways:
            axes = " x ".join(rules["batch"])
            raise ConfigError(
                f"batch_size={batch_size} is not divisible by the {ways} batch shards of the mesh "
                f"({axes}={ways}); use a multiple of {ways}."
            )
        return cls(mesh, rules)

    @property
    def replicated(self) -> NamedSharding:
        return sharding_lib.replicated(self.mesh)

    def tree(self, tree: PyTree) -> PyTree:
        return sharding_lib.tree_shardings(tree, self.mesh, self.rules)

    def constrain_batch(self, batch: Batch) -> dict:
        """Splits the first dimension of every array of ``batch`` over the batch mesh axes
        (where they divide it)."""
        ways = sharding_lib.batch_ways(self.mesh, self.rules)
        if num_rows(batch) % ways:
            return dict(batch)
        spec = sharding_lib.batch_sharding(self.mesh, self.rules, (0,)).spec
        return {
            k: jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))
            for k, x in batch.items()
        }

    def place(self, params: PyTree, frozen: PyTree, data: Batch) -> tuple:
        """Puts a program's arguments on the mesh (no copy for those already there): parameter
        trees by their logical axes, data over the batch axes (each process its own rows)."""
        return (
            sharding_lib.place(params, self.tree(params)),
            sharding_lib.place(frozen, self.tree(frozen)),
            sharding_lib.place_data(dict(data), self.mesh, self.rules),
        )


def _predict_fn(
    model_fn: ModelFn, batch_size: int, constrain_batch: Callable[[Batch], Batch] | None
) -> Callable:
    """The traceable ``predict(trainable, frozen, data, pack_length) -> [N, K]`` of one member."""

    def predict(trainable, frozen, data, pack_length):
        def run_block(b):
            if pack_length:
                b = packing.pack(b, pack_length)
            if constrain_batch is not None:
                b = constrain_batch(b)
            return model_fn(trainable, frozen, b, None)

        return map_rows(run_block, data, batch_size)

    return predict


def make_predict(
    model_fn: ModelFn,
    batch_size: int,
    *,
    mesh: Mesh | None = None,
    rules: sharding_lib.Rules | None = None,
    by_length: bool = False,
) -> Callable[..., jax.Array]:
    """Returns jitted ``predict(trainable, frozen, data, pack_length=None) -> outputs [N, K]`` of
    one run (no member axis), in batches.

    ``data`` (a dict of ``[N, ...]`` arrays) is split into ``ceil(N / batch_size)`` batches of
    one static size, as even as possible (so 32 rows run as one batch of 32, not one of 64, and
    1000 as 16 of 63), and mapped over with ``lax.map``; padding rows are dropped from the
    result. ``pack_length`` (static): each block packed into one row of that many tokens
    (:func:`lora_jax.packing.block_length`). With a ``mesh`` the parameters are placed by
    ``rules``, each block is split over the batch axes when its row count is a multiple of
    their shard count, and the outputs are replicated.

    With ``by_length`` (one device only) the returned ``predict(trainable, frozen, data, *,
    packed=False)`` runs on the host side (no ``jax.vmap`` / ``jax.jit`` around it): rows of
    data with an ``attention_mask`` run sorted by token length, each group of blocks cut to its
    own longest row (:func:`lora_jax.rows.by_length`), outputs back in order: the same outputs
    with less padding computed. ``packed=True`` packs each block instead (for a ``model_fn``
    that reads packed rows): one shape, the padding left out of the dense layers.
    """
    on_mesh = _MeshPlan.make(mesh, rules, None)
    fn = _predict_fn(model_fn, batch_size, on_mesh and on_mesh.constrain_batch)

    def predict(trainable, frozen, data, pack_length=None):
        _check_length(pack_length)
        return fn(trainable, frozen, data, pack_length)

    if on_mesh is None:
        jitted = jax.jit(predict, static_argnames="pack_length")
        if not by_length:
            return jitted
        return _host_predict(
            lambda *args, pack_length=None: jitted(*args, pack_length=pack_length),
            model_fn,
            batch_size,
        )
    if by_length:
        raise ConfigError("make_predict(by_length=True) runs on one device; pass mesh=None.")

    def replicated(trainable, frozen, data):
        return jax.lax.with_sharding_constraint(
            predict(trainable, frozen, data), on_mesh.replicated
        )

    jitted = jax.jit(replicated)

    def on_mesh_predict(trainable, frozen, data, pack_length=None):
        _refuse_packing_on_mesh(pack_length)
        return jitted(*on_mesh.place(trainable, frozen, data))

    return on_mesh_predict


def _host_predict(
    jitted: Callable, model_fn: ModelFn, batch_size: int, *, members_axis: bool = False
) -> Callable:
    """``predict(trainable, frozen, data, *, packed=False)`` around a jitted
    ``jitted(trainable, frozen, data, pack_length=...)``: rows sorted by length, or each block
    packed. With ``members_axis``, outputs are ``[n, N, K]`` and ``data`` is shared (rows
    ``[N, ...]``) or per member (``[n, N, ...]``)."""

    def predict(trainable, frozen, data, *, packed: bool = False):
        if "attention_mask" not in data:
            return jitted(trainable, frozen, data)
        if packed:
            check_packs_rows(model_fn)
            length = packing.block_length(data["attention_mask"], batch_size)
            return jitted(trainable, frozen, data, pack_length=length)
        per_member = members_axis and np.ndim(data["attention_mask"]) == 3
        copies = members.count(trainable) if members_axis and not per_member else 1
        return rows.by_length(
            lambda part: jitted(trainable, frozen, part),
            data,
            batch_size,
            members=per_member,
            out_axis=1 if members_axis else 0,
            copies=copies,  # a shared row runs once per member
        )

    return predict


def evaluate(
    predict: Callable, trainable: PyTree, frozen: PyTree, data: Batch, loss: Loss | str = Loss.CE
) -> dict[str, Any]:
    """Accuracy and loss of ``predict`` 's outputs on ``data`` (a dict with ``labels``).

    Outputs ``[N, K]`` give floats; outputs of a job ``[n, N, K]`` give arrays ``[n]`` (labels
    ``[N]`` shared by the members, or ``[n, N]``).
    """
    outputs = predict(trainable, frozen, data)  # (N, K) or (n, N, K)
    labels = jnp.broadcast_to(data["labels"], outputs.shape[:-1])
    loss_fn = get_loss(loss)
    if outputs.ndim == 2:
        return {
            "accuracy": float(jnp.mean(jnp.argmax(outputs, -1) == labels)),
            "loss": float(loss_fn(outputs, labels)),
        }
    return {
        "accuracy": np.asarray(jnp.mean(jnp.argmax(outputs, -1) == labels, axis=-1)),
        "loss": np.asarray(jax.vmap(loss_fn)(outputs, labels)),
    }


# -- a job's programs -----------------------------------------------------------------------------


class JobPrograms(NamedTuple):
    """The compiled programs of a job (:func:`job_programs`); every leaf of ``state`` /
    ``trainable`` has the member axis ``[n, ...]``."""

    # chunk(state, frozen, data, length, *, shared, pack_length=None) -> (state, losses [n, length])
    chunk: Callable
    # predict(trainable, frozen, data, *, packed=False) -> outputs [n, N, K]
    predict: Callable


def job_programs(
    model_fn: ModelFn,
    cfg: TrainConfig,
    *,
    member_inputs: bool = False,
    mesh: Mesh | None = None,
    rules: sharding_lib.Rules | None = None,
) -> JobPrograms:
    """The training chunk and predict of ``model_fn`` vmapped over a job's members; cached.

    This is the project's one compile cache. Its key is what determines the programs:
    ``model_fn`` (the function object itself: build it once and reuse it), ``cfg`` without its
    ``seed`` and ``learning_rate`` (they live in the state), whether ``frozen`` carries
    per-member inputs (``(frozen, member_inputs)``, batched on their leading axis, e.g.
    ``lora.StackPlan.factors``), the mesh and the rule table. Under each entry ``jax.jit``
    compiles once per distinct argument shapes, dtypes and shardings (the member count ``n``, the
    data's row and token counts) and static arguments (chunk length, ``shared``, packed
    length). So a run recompiles when any of these differ from an earlier run of the process,
    and never for a new seed or learning rate.

    ``shared`` (static) says whether ``data`` is one dict for all members (unbatched) or one
    per member (leading axis ``[n, ...]``); ``predict`` tells by the rank of
    ``attention_mask`` / ``labels``. On a mesh the members of a job of n > 1 are split over the
    mesh axes of the ``adapter`` rule and each member's batch is left whole; a job of one is
    data parallel (each batch over the ``batch`` axes).
    """
    cfg = dataclasses.replace(cfg, seed=0, learning_rate=1.0)
    table = None
    if mesh is not None:
        table = sharding_lib.rules_for_mesh(mesh) if rules is None else rules
        sharding_lib.check_rules(table, mesh)
        table = tuple(sorted((k, tuple(v)) for k, v in table.items()))
    return _job_programs(model_fn, cfg, member_inputs, mesh, table)


def _job_rules(mesh: Mesh, rules: sharding_lib.Rules | None, n: int) -> dict:
    """The rule table of a job of ``n`` on ``mesh``: members over the ``adapter`` axes (unless
    n = 1), default :func:`lora_jax.sharding.rules_for_mesh`."""
    table = dict(sharding_lib.rules_for_mesh(mesh) if rules is None else rules)
    if n == 1:
        table["adapter"] = ()
    return table


@functools.lru_cache(maxsize=32)
def _job_programs(model_fn, cfg, member_inputs: bool, mesh, table) -> JobPrograms:
    frozen_axes = (None, 0) if member_inputs else None
    optimizer = make_optimizer(cfg)

    def on_mesh(n: int) -> _MeshPlan | None:
        """The mesh plan of a job of n, with the batch split only when members are not."""
        if mesh is None:
            return None
        rules = dict(table)
        if n > 1:
            rules["batch"] = ()
        else:
            rules["adapter"] = ()
        return _MeshPlan(mesh, rules)

    def chunk(state, frozen, data, length, shared, pack_length=None):
        plan = on_mesh(int(state.step.shape[0]))
        one = _chunk_fn(model_fn, optimizer, cfg, plan and plan.constrain_batch)
        one = functools.partial(one, length=length, pack_length=pack_length)
        state, losses = jax.vmap(one, in_axes=(0, frozen_axes, None if shared else 0))(
            state, frozen, data
        )
        if plan is not None:
            state = jax.lax.with_sharding_constraint(state, plan.tree(state))
        return state, losses

    def vpredict(trainable, frozen, data, shared, pack_length=None):
        plan = on_mesh(members.count(trainable))
        one = _predict_fn(model_fn, cfg.eval_batch_size, plan and plan.constrain_batch)
        one = functools.partial(one, pack_length=pack_length)
        out = jax.vmap(one, in_axes=(0, frozen_axes, None if shared else 0))(
            trainable, frozen, data
        )
        return out if plan is None else jax.lax.with_sharding_constraint(out, plan.replicated)

    jitted = jax.jit(vpredict, static_argnames=("shared", "pack_length"))

    def predict(trainable, frozen, data, pack_length=None):
        shared = np.ndim(data["labels"]) == 1
        return jitted(trainable, frozen, data, shared, pack_length=pack_length)

    if mesh is not None:

        def host_predict(trainable, frozen, data, *, packed=False):
            _refuse_packing_on_mesh(packed)
            return predict(trainable, frozen, data)

    else:
        host_predict = _host_predict(predict, model_fn, cfg.eval_batch_size, members_axis=True)
    return JobPrograms(
        jax.jit(chunk, donate_argnums=0, static_argnames=("length", "shared", "pack_length")),
        host_predict,
    )


# -- the loop -------------------------------------------------------------------------------------


def write_metrics(paths: Sequence[str | os.PathLike]) -> Callable[[Evaluation], None]:
    """A :func:`fit_job` callback appending member i's records to the JSONL file ``paths[i]``
    (on process 0 only)."""

    def callback(evaluation: Evaluation) -> None:
        if jax.process_index() != 0:
            return
        for path, record in zip(paths, evaluation.records, strict=True):
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    return callback


def _member_data(
    data: Batch | Sequence[Batch], n: int, split: str, names: Sequence[str], batch_size: int = 0
) -> tuple[dict, bool]:
    """``(arrays, shared)``: one dict for all members, or the members' dicts stacked."""
    datas = [data] if isinstance(data, Mapping) else list(data)
    if not isinstance(data, Mapping) and len(datas) != n:
        raise ConfigError(f"fit_job got {len(datas)} {split} sets for {n} members; one each.")
    for i, d in enumerate(datas):
        size = int(np.shape(d["labels"])[0])
        if size < batch_size:
            who = names[i] if not isinstance(data, Mapping) else " / ".join(names)
            raise ConfigError(
                f"{who + ': t' if who else 'T'}he training set has {size} examples, fewer than "
                f"the batch size "
                f"{batch_size}; lower the batch size (TrainConfig.batch_size, --batch-size) to "
                f"{size} or less, or give it more examples."
            )
    if isinstance(data, Mapping):
        return {k: jnp.asarray(v) for k, v in data.items()}, True
    shapes = [{k: tuple(np.shape(v)) for k, v in d.items()} for d in datas]
    for i, s in enumerate(shapes):
        if s != shapes[0]:
            raise ConfigError(
                f"The {split} sets of {names[0]} and {names[i]} differ in shape ({shapes[0]} vs "
                f"{s}); the members of one job need equally many examples of one length. Fix: "
                "pad the sequences to one length, or run them in separate jobs."
            )
    return members.stack([{k: jnp.asarray(v) for k, v in d.items()} for d in datas]), False


def _place(tree: PyTree, mesh: Mesh | None, table: dict, *, data: bool = False, shared=True):
    """Puts ``tree`` on the mesh: parameter trees by their logical axes, shared data over the
    batch axes, per-member data over the ``adapter`` axes."""
    if mesh is None or tree is None:
        return tree
    if not data:
        return sharding_lib.place(tree, sharding_lib.tree_shardings(tree, mesh, table))
    if shared:
        if table["batch"]:
            return sharding_lib.place_data(dict(tree), mesh, table)
        return sharding_lib.place(tree, jax.tree.map(lambda _: sharding_lib.replicated(mesh), tree))
    axes = lambda x: ("adapter",) + (None,) * (np.ndim(x) - 1)  # noqa: E731
    return sharding_lib.place(
        tree,
        jax.tree.map(
            lambda x: NamedSharding(
                mesh, sharding_lib.spec(axes(x), np.shape(x), mesh, table, where="job members")
            ),
            tree,
        ),
    )


def fit_job(
    model_fn: ModelFn,
    state: TrainState,
    frozen: PyTree,
    train_data: Batch | Sequence[Batch],
    dev_data: Batch | Sequence[Batch],
    cfg: TrainConfig,
    *,
    member_inputs: PyTree | None = None,
    test_data: Batch | None = None,
    names: Sequence[str] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    callbacks: Sequence[Callable[[Evaluation], None]] = (),
    progress: bool | str = True,
    mesh: Mesh | None = None,
    rules: sharding_lib.Rules | None = None,
    pack_length: int | None = None,
) -> list[FitResult]:
    """Trains the ``n`` members of a job for ``cfg.steps``, evaluating on dev every
    ``cfg.eval_every`` steps and after the last one (see :func:`chunk_lengths`).

    Each member keeps its parameters of best dev accuracy (ties: the earlier step, as in
    LM-BFF). Member i's losses, best step and parameters are those of :func:`fit` on member i
    alone (to float rounding). With ``checkpoint_dir`` the stacked state and best parameters are
    saved with orbax at every evaluation, and a later call with the same directory resumes from
    the last one, identical to an uninterrupted run.

    Args:
      model_fn: ``(trainable, frozen, batch, dropout_rng) -> [B, K]`` of one member; with
        ``member_inputs`` it receives ``frozen`` as ``(frozen, member_inputs[i])``.
      state: stacked initial state (:func:`init_states`); ignored when resuming.
      frozen: parameters shared by all members, passed once and unbatched.
      train_data: a dict of ``[N_train, ...]`` arrays (with ``labels``) shared by all members,
        or one such dict per member (all of one shape).
      dev_data: as ``train_data``, for dev.
      cfg: shared hyperparameters (``learning_rate`` and ``seed`` are per member, in ``state``).
      member_inputs: per-member inputs that are not trained, leaves ``[n, ...]``.
      test_data: evaluated with each member's best parameters at the end (``FitResult.test``).
      names: a name per member for messages (e.g. ``mr/lora-r1/seed13``).
      checkpoint_dir: where to save / resume; None disables checkpoints.
      callbacks: called with an :class:`Evaluation` after each dev evaluation (e.g.
        :func:`write_metrics`).
      progress: show a tqdm bar over member-steps (a string is used as its description).
      mesh: run on this mesh (see :mod:`lora_jax.sharding`), placed by ``rules`` (default
        ``rules_for_mesh(mesh)``): a job of one is data parallel (each batch over the ``batch``
        axes, parameters by their logical axes); a larger job splits its members over the
        ``adapter`` axes with the base placed by its logical axes. On several processes every
        process calls with the same arguments and contributes its own rows (jobs of one only).
      rules: the logical-axis rule table.
      pack_length: train on packed batches of this many tokens (:mod:`lora_jax.packing`; at
        least :func:`pack_length` of every member), so padding costs no compute; dev and test
        are evaluated packed too. Needs a ``model_fn`` that reads packed batches and one device.
        None: padded batches.

    Returns:
      One :class:`FitResult` per member.

    Raises:
      ConfigError: a training set smaller than the batch, members' data that differ in shape
        or number, packing on a mesh, or a job of several members on several processes.
    """
    n = int(state.step.shape[0])
    if names is None:
        names = [""] if n == 1 else [f"member {i}" for i in range(n)]
    train_arrays, shared_train = _member_data(train_data, n, "training", names, cfg.batch_size)
    dev_arrays, _ = _member_data(dev_data, n, "dev", names)
    if pack_length is not None:
        _check_length(pack_length)
        if mesh is not None:
            _refuse_packing_on_mesh(pack_length)
        needed = max(
            _least_pack_length(model_fn, state.rng[i], cfg.steps, data, cfg.batch_size)
            for i, data in enumerate(
                [train_data] * n if isinstance(train_data, Mapping) else train_data
            )
        )
        if pack_length < needed:
            raise ConfigError(
                f"pack_length={pack_length} tokens cannot hold this run's largest batch "
                f"({needed} tokens); pass train.pack_length(...) of every member, or more."
            )
    if mesh is not None and n > 1 and jax.process_count() > 1:
        raise ConfigError(
            f"A job of {n} members runs on one process; on several processes train one member "
            "per job."
        )
    programs = job_programs(
        model_fn, cfg, member_inputs=member_inputs is not None, mesh=mesh, rules=rules
    )
    table = None if mesh is None else _job_rules(mesh, rules, n)
    if mesh is not None and n == 1:
        _MeshPlan.make(mesh, table, cfg.batch_size)  # each batch splits over the batch axes
    place = functools.partial(_place, mesh=mesh, table=table)
    state = jax.tree.map(jnp.copy, place(state))  # the chunks donate their state
    best = jax.tree.map(jnp.copy, state.trainable)
    log = {"best_accuracy": [-1.0] * n, "best_step": [0] * n, "history": [[] for _ in range(n)]}
    if checkpoint_dir is not None:
        restored = checkpoint.restore(checkpoint_dir, {"state": state, "best": best})
        if restored is not None:
            state, best, log = restored.tree["state"], restored.tree["best"], restored.meta
    base = place(frozen)
    args = base if member_inputs is None else (base, place(member_inputs))
    train_arrays = place(train_arrays, data=True, shared=shared_train)
    dev_arrays = place(dev_arrays, data=True, shared=np.ndim(dev_arrays["labels"]) == 1)
    predict = functools.partial(programs.predict, packed=pack_length is not None)

    start = int(state.step[0])
    bar = tqdm(
        total=n * cfg.steps,
        initial=n * start,
        desc=progress if isinstance(progress, str) else "train",
        disable=not progress,
        unit="member-step" if n > 1 else "step",
        leave=False,
    )
    for length in chunk_lengths(cfg.steps, cfg.eval_every, start):
        state, losses = programs.chunk(
            state, args, train_arrays, length, shared=shared_train, pack_length=pack_length
        )
        step = int(state.step[0])
        dev = evaluate(predict, state.trainable, args, dev_arrays, cfg.loss)
        evaluation = _evaluation(step, np.asarray(jnp.mean(losses, axis=1)), dev, log)
        if any(evaluation.improved):
            # Copy: the next chunk donates (and so invalidates) the state's buffers.
            best = members.select(jnp.asarray(evaluation.improved), state.trainable, best)
            best = jax.tree.map(jnp.copy, best)
        for callback in callbacks:
            callback(evaluation)
        if checkpoint_dir is not None:
            checkpoint.save(checkpoint_dir, step, {"state": state, "best": best}, log)
        bar.update(n * length)
        bar.set_postfix(
            loss=f"{np.mean([r['train_loss'] for r in evaluation.records]):.3f}",
            dev=f"{np.mean(dev['accuracy']):.3f}",
        )
    bar.close()
    test = None
    if test_data is not None:
        test_arrays, _ = _member_data(test_data, n, "test", names)
        test_arrays = place(test_arrays, data=True, shared=True)
        test = evaluate(predict, best, args, test_arrays, cfg.loss)
    return [
        FitResult(
            members.member(state, i),
            members.member(best, i),
            log["best_step"][i],
            log["best_accuracy"][i],
            log["history"][i],
            None if test is None else {k: float(v[i]) for k, v in test.items()},
        )
        for i in range(n)
    ]


def _evaluation(step: int, train_loss: np.ndarray, dev: dict, log: dict) -> Evaluation:
    """The records of one evaluation; updates ``log`` 's best accuracy and step per member."""
    records, improved = [], []
    for i, loss in enumerate(train_loss):
        record = {
            "step": step,
            "train_loss": float(loss),
            "dev_accuracy": float(dev["accuracy"][i]),
            "dev_loss": float(dev["loss"][i]),
        }
        improved.append(record["dev_accuracy"] > log["best_accuracy"][i])
        if improved[-1]:
            log["best_accuracy"][i], log["best_step"][i] = record["dev_accuracy"], step
        log["history"][i].append(record)
        records.append(record)
    return Evaluation(step, records, improved)


def fit(
    model_fn: ModelFn,
    state: TrainState,
    frozen: PyTree,
    train_data: Batch,
    dev_data: Batch,
    cfg: TrainConfig,
    *,
    test_data: Batch | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    metrics_path: str | os.PathLike | None = None,
    progress: bool | str = True,
    mesh: Mesh | None = None,
    rules: sharding_lib.Rules | None = None,
    pack_length: int | None = None,
) -> FitResult:
    """Trains one run: :func:`fit_job` with a job of one member.

    Args:
      model_fn: ``(trainable, frozen, batch, dropout_rng) -> outputs [B, K]``.
      state: initial state (see :func:`init_state`); ignored when resuming from a checkpoint.
      frozen: parameters that are not trained (passed to ``model_fn``).
      train_data: dict of ``[N_train, ...]`` arrays with ``labels``.
      dev_data: dict of ``[N_dev, ...]`` arrays with ``labels``.
      cfg: hyperparameters.
      test_data: evaluated with the best parameters at the end (``FitResult.test``).
      checkpoint_dir: where to save / resume; None disables checkpoints.
      metrics_path: JSONL file to append evaluation records to (process 0 only).
      progress: show a tqdm bar (a string is used as its description).
      mesh: run data parallel on this mesh (see :func:`fit_job`); on several processes every
        process calls ``fit`` with the same arguments and contributes its own rows of the data.
      rules: the logical-axis rule table.
      pack_length: train (and evaluate) on packed batches of this many tokens; at least
        :func:`pack_length` (``model_fn, state.rng, cfg.steps, train_data, cfg.batch_size``).

    Returns:
      A :class:`FitResult`.
    """
    callbacks = () if metrics_path is None else (write_metrics([metrics_path]),)
    (result,) = fit_job(
        model_fn,
        members.stack([state]),
        frozen,
        train_data,
        dev_data,
        cfg,
        test_data=test_data,
        checkpoint_dir=checkpoint_dir,
        callbacks=callbacks,
        progress=progress,
        mesh=mesh,
        rules=rules,
        pack_length=pack_length,
    )
    return result
