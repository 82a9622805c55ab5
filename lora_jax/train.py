"""The optax training loop: one jitted chunk of steps, evaluation, best-dev selection, resume.

The model is any ``model_fn(trainable, frozen, batch, dropout_rng) -> outputs [B, K]``: LoRA
adapters over a frozen base, all weights, only a head, or a linearized model from ``ntk`` all
train through the same loop. Data stays on the device as a dict of ``[N, ...]`` arrays; each
step gathers its batch by index from a per-epoch permutation derived from the step counter, so
the loop keeps no host-side state and a resumed run sees exactly the batches an uninterrupted
run would. ``eval_every`` steps run as one ``lax.scan`` inside one ``jax.jit`` call (a shorter
last chunk when ``eval_every`` does not divide ``steps`` is one more compiled program).

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
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from lora_jax import checkpoint, packing
from lora_jax import sharding as sharding_lib
from lora_jax.errors import ConfigError
from lora_jax.losses import Loss, get_loss
from lora_jax.rows import by_length_fn, map_rows, num_rows

PyTree = Any
Batch = Mapping[str, jax.Array]
ModelFn = Callable[[PyTree, PyTree, Batch, jax.Array | None], jax.Array]


class Optimizer(enum.StrEnum):
    """Optimizer: ``adamw`` (decoupled weight decay) or ``sgd`` (with optional momentum)."""

    ADAMW = "adamw"
    SGD = "sgd"


class Schedule(enum.StrEnum):
    """Learning-rate schedule after linear warmup: constant, linear decay to 0, or cosine."""

    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


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
    """What :func:`fit` returns."""

    state: TrainState  # the final state.
    best_trainable: PyTree  # trainable parameters at the best dev evaluation.
    best_step: int
    best_dev_accuracy: float
    history: list[dict]  # one dict per evaluation (the JSONL records).


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Builds the optax chain: clip -> optimizer with warmup + schedule -> accumulation."""
    updates = max(cfg.steps // cfg.grad_accum, 1)
    warmup = cfg.warmup_steps // cfg.grad_accum
    decay = max(updates - warmup, 1)
    peak = cfg.learning_rate
    after = {
        Schedule.CONSTANT: optax.constant_schedule(peak),
        Schedule.LINEAR: optax.linear_schedule(peak, 0.0, decay),
        Schedule.COSINE: optax.cosine_decay_schedule(peak, decay),
    }[cfg.schedule]
    lr = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])
    if cfg.optimizer == Optimizer.ADAMW:
        opt = optax.adamw(lr, weight_decay=cfg.weight_decay)
    else:
        opt = optax.sgd(lr, momentum=cfg.momentum or None)
    if cfg.max_grad_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
    if cfg.grad_accum > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=cfg.grad_accum)
    return opt


def init_state(trainable: PyTree, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """Fresh state at step 0."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        opt_state=optimizer.init(trainable),
        rng=jax.random.key_data(jax.random.key(seed)),
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


def _check_length(pack: Any, sized_by: str, sizes_itself: str) -> None:
    """A compiled program's ``pack`` is a packed length (an int), not a switch."""
    if isinstance(pack, bool) or not isinstance(pack, int) or pack < 0:
        raise ConfigError(
            f"pack={pack!r}: here pack is the packed length in tokens (0 = off), from "
            f"{sized_by}; {sizes_itself} takes pack=True and sizes it itself."
        )


def check_packs_rows(model_fn: ModelFn) -> None:
    """ConfigError unless ``model_fn`` reads packed batches (sets ``packs_rows``)."""
    if not getattr(model_fn, "packs_rows", False):
        raise ConfigError(
            "pack=True needs a model_fn that reads packed batches (model_fn.packs_rows; "
            "make_model_fn over make_output_fn's MLM / TIED / TIED_MEAN readouts of this "
            "library's encoders, DeBERTa excepted, sets it). Use pack=False."
        )


def pack_length(
    model_fn: ModelFn, rng: jax.Array, steps: int, train_data: Batch, batch_size: int
) -> int:
    """The packed length (:mod:`lora_jax.packing`) of a run's batches; ConfigError if
    ``model_fn`` does not read packed batches (does not set ``packs_rows``)."""
    check_packs_rows(model_fn)
    if "attention_mask" not in train_data:
        raise ConfigError("pack=True needs token rows: train_data has no 'attention_mask'.")
    n = int(np.shape(train_data["labels"])[0])
    return packing.packed_length(
        np.asarray(train_data["attention_mask"]), batch_schedule(rng, steps, n, batch_size)
    )


def make_train_chunk(
    model_fn: ModelFn,
    optimizer: optax.GradientTransformation,
    cfg: TrainConfig,
    *,
    mesh: Mesh | None = None,
    rules: sharding_lib.Rules | None = None,
) -> Callable[[TrainState, PyTree, Batch], tuple[TrainState, jax.Array]]:
    """Returns ``chunk(state, frozen, data, length=None, pack=0) -> (state, losses [length])``.

    ``data`` is the whole training set as a dict of ``[N, ...]`` arrays (with ``labels`` [N]);
    ``frozen`` is passed in (not closed over) so its arrays are not baked into the program.

    With a ``mesh``, the program is compiled with in / out shardings from ``rules`` (default
    :func:`lora_jax.sharding.rules_for_mesh`): the state (trainable tree and optimizer state)
    and ``frozen`` by their logical axes, ``data`` over the batch axes, and each step's batch
    constrained to the batch axes. The state keeps its shardings from chunk to chunk.
    ``length`` (static; default ``cfg.eval_every``) is the number of steps; each distinct value
    is compiled once. ``pack`` (static): when > 0, each step's batch is packed into one row of
    that many tokens (:func:`lora_jax.packing.pack`; size it with :func:`pack_length`), so
    padding costs no compute; the model must read packed batches. One device only.
    """
    loss_fn = get_loss(cfg.loss)
    on_mesh = _MeshPlan.make(mesh, rules, cfg.batch_size)

    def objective(trainable, frozen, batch, dropout_rng):
        outputs = model_fn(trainable, frozen, batch, dropout_rng)
        return loss_fn(outputs, batch["labels"])

    def step(carry, _, frozen, data, pack):
        state: TrainState = carry
        num_examples = data["labels"].shape[0]
        idx = batch_indices(state.rng, state.step, num_examples, cfg.batch_size)
        batch = jax.tree.map(lambda x: x[idx], data)
        if pack:
            batch = packing.pack(batch, pack)
        if on_mesh is not None:
            batch = on_mesh.constrain_batch(batch)
        dropout_rng = dropout_key(state.rng, state.step) if cfg.dropout else None
        loss, grads = jax.value_and_grad(objective)(state.trainable, frozen, batch, dropout_rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        return TrainState(state.step + 1, trainable, opt_state, state.rng), loss

    def chunk(state, frozen, data, length=None, pack=0):
        _check_length(pack, "train.pack_length", "train.fit")
        if data["labels"].shape[0] < cfg.batch_size:
            raise ConfigError(
                f"Training set has {data['labels'].shape[0]} examples, fewer than "
                f"batch_size={cfg.batch_size}; lower TrainConfig.batch_size."
            )
        body = lambda carry, x: step(carry, x, frozen, data, pack)  # noqa: E731
        return jax.lax.scan(body, state, None, length=length or cfg.eval_every)

    if on_mesh is None:
        return jax.jit(chunk, donate_argnums=0, static_argnames=("length", "pack"))
    sharded = on_mesh.jit(
        chunk,
        lambda state, frozen, data: (on_mesh.tree(state), on_mesh.tree(frozen), on_mesh.data(data)),
        lambda ins: (ins[0], on_mesh.replicated),
        donate_argnums=0,
    )

    def on_mesh_chunk(state, frozen, data, length=None, pack=0):
        if pack:
            raise ConfigError(
                "Packed batches run on one device (a packed row cannot be split over the batch "
                "axes); train on a mesh with pack=False."
            )
        return sharded(state, frozen, data, length=length)

    return on_mesh_chunk


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

    def data(self, data: Batch) -> dict:
        return sharding_lib.data_shardings(data, self.mesh, self.rules)

    def constrain_batch(self, batch: Batch) -> dict:
        """Splits the first dimension of every array of ``batch`` over the batch mesh axes."""
        spec = sharding_lib.batch_sharding(self.mesh, self.rules, (0,)).spec
        return {
            k: jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))
            for k, x in batch.items()
        }

    def jit(self, fn, in_shardings_fn, out_shardings_fn, donate_argnums=()):
        """``jax.jit(fn)`` with in / out shardings derived from the arguments' paths and shapes.

        One compiled program per argument structure (shapes and shardings) and per value of
        the keyword arguments (static, like ``jax.jit`` 's ``static_argnames``).
        """
        compiled: dict = {}

        def call(*args, **static):
            ins = in_shardings_fn(*args)
            key = (jax.tree.structure(ins), tuple(jax.tree.leaves(ins)), tuple(static.items()))
            if key not in compiled:
                compiled[key] = jax.jit(
                    functools.partial(fn, **static),
                    in_shardings=ins,
                    out_shardings=out_shardings_fn(ins),
                    donate_argnums=donate_argnums,
                )
            return compiled[key](*args)

        return call


def make_predict(
    model_fn: ModelFn,
    batch_size: int,
    *,
    mesh: Mesh | None = None,
    rules: sharding_lib.Rules | None = None,
    by_length: bool = False,
) -> Callable[[PyTree, PyTree, Batch], jax.Array]:
    """Returns jitted ``predict(trainable, frozen, data, pack=0) -> outputs [N, K]`` in batches.

    ``data`` (a dict of ``[N, ...]`` arrays) is split into ``ceil(N / batch_size)`` batches of
    one static size, as even as possible (so 32 rows run as one batch of 32, not one of 64, and
    1000 as 16 of 63), and mapped over with ``lax.map``; padding rows are dropped from the
    result. With a ``mesh`` the parameters are placed by ``rules``, each block is split over the
    batch axes when its row count is a multiple of their shard count, and the outputs are
    replicated.

    With ``by_length`` (one device only) the rows of data with an ``attention_mask`` run sorted
    by token length, each group of blocks cut to its own longest row, and the outputs come back
    in order (:func:`lora_jax.rows.by_length`): the same outputs, with less padding computed
    when lengths vary (a few shapes, each compiled once). That ``predict`` runs on the host
    side and cannot be traced (no ``jax.vmap`` / ``jax.jit`` around it); its ``pack=True``
    packs each block instead (:mod:`lora_jax.packing`, for a ``model_fn`` that reads packed
    rows): one shape, the padding left out of the dense layers. The traceable ``predict``'s
    ``pack`` (static) is the packed length itself (:func:`lora_jax.packing.block_length`).
    """
    on_mesh = _MeshPlan.make(mesh, rules, None)
    ways = 1 if on_mesh is None else sharding_lib.batch_ways(on_mesh.mesh, on_mesh.rules)

    def predict(trainable, frozen, data, pack=0):
        _check_length(pack, "packing.block_length", "make_predict(by_length=True)'s predict")

        def run_block(b):
            if pack:
                b = packing.pack(b, pack)
            if on_mesh is not None and num_rows(b) % ways == 0:
                b = on_mesh.constrain_batch(b)
            return model_fn(trainable, frozen, b, None)

        return map_rows(run_block, data, batch_size)

    if on_mesh is None:
        jitted = jax.jit(predict, static_argnames="pack")
        return _host_predict(jitted, model_fn, batch_size) if by_length else jitted
    if by_length:
        raise ConfigError("make_predict(by_length=True) runs on one device; pass mesh=None.")
    return on_mesh.jit(
        predict,
        lambda trainable, frozen, data: (
            on_mesh.tree(trainable),
            on_mesh.tree(frozen),
            on_mesh.data(data),
        ),
        lambda ins: on_mesh.replicated,
    )


def _host_predict(jitted: Callable, model_fn: ModelFn, batch_size: int) -> Callable:
    """``predict(trainable, frozen, data, *, pack=False)``: sorted by length, or packed."""
    sorted_predict = by_length_fn(jitted, batch_size)

    def predict(trainable, frozen, data, *, pack: bool = False):
        if not pack or "attention_mask" not in data:
            return sorted_predict(trainable, frozen, data)
        check_packs_rows(model_fn)
        length = packing.block_length(data["attention_mask"], batch_size)
        return jitted(trainable, frozen, data, pack=length)

    return predict


def evaluate(
    predict: Callable, trainable: PyTree, frozen: PyTree, data: Batch, loss: Loss | str = Loss.CE
) -> dict[str, float]:
    """Accuracy and loss of ``predict`` 's outputs on ``data`` (a dict with ``labels``)."""
    outputs = predict(trainable, frozen, data)
    labels = data["labels"]
    return {
        "accuracy": float(jnp.mean(jnp.argmax(outputs, -1) == labels)),
        "loss": float(get_loss(loss)(outputs, labels)),
    }


class Programs(NamedTuple):
    """The optimizer and compiled programs of one (model_fn, config)."""

    optimizer: optax.GradientTransformation
    chunk: Callable  # see make_train_chunk
    predict: Callable  # see make_predict (by_length on one device)


def programs(
    model_fn: ModelFn,
    cfg: TrainConfig,
    *,
    mesh: Mesh | None = None,
    rules: sharding_lib.Rules | None = None,
) -> Programs:
    """Optimizer, train chunk and predict for ``model_fn`` and ``cfg``, built once and reused.

    Runs that differ only in ``cfg.seed`` (the seeds of a sweep) share the compiled programs,
    since the seed lives in the state, not in the program. ``mesh`` and ``rules`` as in
    :func:`make_train_chunk`; without a mesh, ``predict`` sorts rows by length
    (``make_predict(by_length=True)``).
    """
    frozen_rules = None if rules is None else tuple(sorted((k, tuple(v)) for k, v in rules.items()))
    return _programs(model_fn, dataclasses.replace(cfg, seed=0), mesh, frozen_rules)


@functools.lru_cache(maxsize=32)
def _programs(model_fn: ModelFn, cfg: TrainConfig, mesh, rules) -> Programs:
    rules = None if rules is None else dict(rules)
    optimizer = make_optimizer(cfg)
    return Programs(
        optimizer,
        make_train_chunk(model_fn, optimizer, cfg, mesh=mesh, rules=rules),
        make_predict(model_fn, cfg.eval_batch_size, mesh=mesh, rules=rules, by_length=mesh is None),
    )


def fit(
    model_fn: ModelFn,
    state: TrainState,
    frozen: PyTree,
    train_data: Batch,
    dev_data: Batch,
    cfg: TrainConfig,
    *,
    optimizer: optax.GradientTransformation | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    metrics_path: str | os.PathLike | None = None,
    progress: bool | str = True,
    mesh: Mesh | None = None,
    rules: sharding_lib.Rules | None = None,
    pack: bool | int = False,
) -> FitResult:
    """Trains for ``cfg.steps``, evaluating on ``dev_data`` every ``cfg.eval_every`` steps and
    after the last one (see :func:`chunk_lengths`).

    Keeps the trainable parameters of the best dev accuracy (ties: the earlier step, as in
    LM-BFF). With ``checkpoint_dir`` the state and the best parameters are saved with orbax at
    every evaluation, and a later call with the same directory resumes from the last one; the
    result is then identical to an uninterrupted run. With ``metrics_path`` each evaluation is
    appended to that JSONL file.

    Args:
      model_fn: ``(trainable, frozen, batch, dropout_rng) -> outputs [B, K]``.
      state: initial state (see :func:`init_state`); ignored when resuming from a checkpoint.
      frozen: parameters that are not trained (passed to ``model_fn``).
      train_data: dict of ``[N_train, ...]`` arrays with ``labels``.
      dev_data: dict of ``[N_dev, ...]`` arrays with ``labels``.
      cfg: hyperparameters.
      optimizer: defaults to :func:`make_optimizer` (cfg), compiled once per (model_fn, cfg)
        (see :func:`programs`); must match the one ``state`` was built with.
      checkpoint_dir: where to save / resume; None disables checkpoints.
      metrics_path: JSONL file to append evaluation records to.
      progress: show a tqdm bar (a string is used as its description).
      mesh: run on this mesh (see :mod:`lora_jax.sharding`): ``frozen``, the state and the data
        are placed by ``rules`` (default ``rules_for_mesh(mesh)``), and the state stays sharded.
        On several processes every process calls ``fit`` with the same arguments; each
        contributes its own rows of the data, checkpoints are written collectively, and only
        process 0 appends to ``metrics_path``.
      rules: the logical-axis rule table.
      pack: train on packed batches (:mod:`lora_jax.packing`): each step's rows laid end to
        end in one row, as long as the run's largest batch of real tokens (True), or of this
        many tokens (an int at least that large: runs that share one length share one
        compiled chunk), so padding costs no compute; the dev set is evaluated packed too.
        Same model, same batches, same results to float rounding (dropout: the same rates on
        other random masks). Needs a ``model_fn`` that reads packed batches (``packs_rows``)
        and one device.

    Returns:
      A :class:`FitResult`.
    """
    if pack and mesh is not None:
        raise ConfigError(
            "pack=True runs on one device (a packed row cannot be split over the batch axes); "
            "train on a mesh with pack=False."
        )
    packed = 0
    if pack:
        packed = pack_length(model_fn, state.rng, cfg.steps, train_data, cfg.batch_size)
        if pack is not True:
            if pack < packed:
                raise ConfigError(
                    f"pack={pack} tokens cannot hold this run's largest batch ({packed} tokens); "
                    "pass pack=True to size it, or a length >= that."
                )
            packed = int(pack)
    if optimizer is None:
        _, chunk, predict = programs(model_fn, cfg, mesh=mesh, rules=rules)
    else:
        chunk = make_train_chunk(model_fn, optimizer, cfg, mesh=mesh, rules=rules)
        predict = make_predict(
            model_fn, cfg.eval_batch_size, mesh=mesh, rules=rules, by_length=mesh is None
        )
    if mesh is None:
        train_data = jax.tree.map(jnp.asarray, dict(train_data))
        dev_data = jax.tree.map(jnp.asarray, dict(dev_data))
        # fit() donates its state to the compiled chunks; copy so the caller's arrays stay valid.
        state = jax.tree.map(jnp.copy, state)
    else:
        table = sharding_lib.rules_for_mesh(mesh) if rules is None else rules
        train_data = sharding_lib.place_data(dict(train_data), mesh, table)
        dev_data = sharding_lib.place_data(dict(dev_data), mesh, table)
        frozen = sharding_lib.place(frozen, sharding_lib.tree_shardings(frozen, mesh, table))
        shardings = sharding_lib.tree_shardings(state, mesh, table)
        state = jax.tree.map(jnp.copy, sharding_lib.place(state, shardings))
    best_trainable = state.trainable
    log = {"best_accuracy": -1.0, "best_step": 0, "history": []}  # saved as checkpoint metadata
    if checkpoint_dir is not None:
        restored = checkpoint.restore(checkpoint_dir, {"state": state, "best": best_trainable})
        if restored is not None:
            state, best_trainable = restored.tree["state"], restored.tree["best"]
            log = restored.meta

    dev_predict = functools.partial(predict, pack=True) if pack else predict
    start = int(state.step)
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=progress if isinstance(progress, str) else "train",
        disable=not progress,
        unit="step",
        leave=False,
    )
    for length in chunk_lengths(cfg.steps, cfg.eval_every, start):
        state, losses = chunk(state, frozen, train_data, length, packed)
        step = int(state.step)
        dev = evaluate(dev_predict, state.trainable, frozen, dev_data, cfg.loss)
        record = {
            "step": step,
            "train_loss": float(jnp.mean(losses)),
            "dev_accuracy": dev["accuracy"],
            "dev_loss": dev["loss"],
        }
        if dev["accuracy"] > log["best_accuracy"]:
            # Copy: the next chunk donates (and so invalidates) the state's buffers.
            best_trainable = jax.tree.map(jnp.copy, state.trainable)
            log.update(best_accuracy=dev["accuracy"], best_step=step)
        log["history"].append(record)
        if metrics_path is not None and jax.process_index() == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if checkpoint_dir is not None:
            checkpoint.save(checkpoint_dir, step, {"state": state, "best": best_trainable}, log)
        bar.update(length)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", dev=f"{dev['accuracy']:.3f}")
    bar.close()
    return FitResult(state, best_trainable, log["best_step"], log["best_accuracy"], log["history"])
