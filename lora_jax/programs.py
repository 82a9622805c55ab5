"""The compiled programs of training and prediction, and the one cache that holds them.

A step of one run (:func:`make_train_chunk`): gather the batch of the step by index from a
per-epoch permutation derived from the step counter (:func:`batch_indices`), optionally pack it
(:mod:`lora_jax.packing`), take the loss's gradient and apply the optax update. ``eval_every``
steps run as one ``lax.scan`` inside one ``jax.jit`` call. A job's programs
(:func:`job_programs`) ``jax.vmap`` the same step over the job's members with the frozen base
unbatched, so for a base kernel ``W`` (in, out) XLA runs one ``(n B T, in) @ (in, out)`` GEMM for
all members (with the fused LoRA path); they are what :func:`lora_jax.train.fit_job` runs.
Prediction (:func:`make_predict`) maps the model over fixed-size blocks of rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from lora_jax import distributed, members, packing, rows
from lora_jax import sharding as sharding_lib
from lora_jax.capabilities import capabilities_of
from lora_jax.errors import ConfigError
from lora_jax.losses import Loss, get_loss
from lora_jax.optim import make_optimizer
from lora_jax.rows import map_rows, num_rows

if TYPE_CHECKING:
    from lora_jax.train import TrainConfig

PyTree = Any
Batch = Mapping[str, jax.Array]
ModelFn = Callable[[PyTree, PyTree, Batch, jax.Array | None], jax.Array]

__all__ = [
    "JobPrograms",
    "TrainState",
    "batch_indices",
    "batch_schedule",
    "check_batch_fits",
    "check_batch_split",
    "check_pack_length",
    "check_packs_rows",
    "dropout_key",
    "evaluate",
    "job_programs",
    "job_rules",
    "make_predict",
    "member_slots",
    "make_train_chunk",
    "pack_length_needed",
]


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
    """ConfigError unless ``model_fn`` declares that it reads packed batches."""
    if not capabilities_of(model_fn).packs_rows:
        raise ConfigError(
            "packed batches need a model_fn that reads them, and this one does not declare "
            "packs_rows (lora_jax.capabilities: make_model_fn over make_output_fn's MLM / TIED / "
            "TIED_MEAN readouts of this library's encoders, DeBERTa excepted, declare it; a "
            "wrapper of such a function keeps it as Declared(wrapper, capabilities_of(fn))). "
            "Train on padded batches (pack_length=None)."
        )


def check_batch_fits(num_examples: int, batch_size: int, who: str = "") -> None:
    """ConfigError unless a training set of ``num_examples`` holds a batch of ``batch_size``;
    ``who`` (e.g. a cell's name) starts the message."""
    if num_examples < batch_size:
        raise ConfigError(
            f"{who + ': t' if who else 'T'}he training set has {num_examples} examples, fewer "
            f"than the batch size {batch_size}; lower the batch size (TrainConfig.batch_size, "
            f"--batch-size) to {num_examples} or less, or give it more examples."
        )


def pack_length_needed(
    model_fn: ModelFn, rng: jax.Array, steps: int, train_data: Batch, batch_size: int
) -> int:
    """The least packed length (:mod:`lora_jax.packing`) that holds every batch a run of
    ``steps`` with batch-order key ``rng`` (``TrainState.rng``) draws from ``train_data``.

    Pass it (or any larger length) as ``train.fit`` 's ``pack_length``. ConfigError if ``model_fn``
    does not read packed batches.
    """
    check_packs_rows(model_fn)
    if "attention_mask" not in train_data:
        raise ConfigError("packed batches need token rows: train_data has no 'attention_mask'.")
    n = int(np.shape(train_data["labels"])[0])
    check_batch_fits(n, batch_size)
    return packing.packed_length(
        np.asarray(train_data["attention_mask"]), batch_schedule(rng, steps, n, batch_size)
    )


def _chunk_fn(
    model_fn: ModelFn,
    optimizer: optax.GradientTransformation,
    cfg: TrainConfig,
    plan: _MeshPlan | None = None,
) -> Callable:
    """The traceable ``chunk(state, frozen, data, length, pack_length)`` of one member; on a
    mesh (``plan``) each step's batch is split over the batch axes, and where the step is purely
    data parallel its gradient is reduced once (:meth:`_MeshPlan.value_and_grad`)."""
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
        dropout_rng = dropout_key(state.rng, state.step) if cfg.train_dropout else None
        if plan is None:
            loss, grads = jax.value_and_grad(objective)(state.trainable, frozen, batch, dropout_rng)
        else:
            batch = plan.constrain_batch(batch)
            args = (state.trainable, frozen, batch, dropout_rng)
            loss, grads = plan.value_and_grad(objective, *args)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        return TrainState(state.step + 1, trainable, opt_state, state.rng), loss

    def chunk(state, frozen, data, length, pack_length):
        check_batch_fits(data["labels"].shape[0], cfg.batch_size)
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
    fn = _chunk_fn(model_fn, optimizer, cfg, on_mesh)

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


def check_pack_length(
    model_fn: ModelFn,
    pack_length: int | None,
    *,
    mesh: Mesh | None,
    rngs: jax.Array,
    steps: int,
    datas: Sequence[Batch],
    batch_size: int,
) -> None:
    """ConfigError unless a job can train on batches packed to ``pack_length`` (None: padded):
    one device, a model that reads packed rows, and room for every member's largest batch
    (member i draws with ``rngs[i]`` from ``datas[i]``)."""
    if pack_length is None:
        return
    _check_length(pack_length)
    if mesh is not None:
        _refuse_packing_on_mesh(pack_length)
    needed = max(
        pack_length_needed(model_fn, rng, steps, data, batch_size)
        for rng, data in zip(rngs, datas, strict=True)
    )
    if pack_length < needed:
        raise ConfigError(
            f"pack_length={pack_length} tokens cannot hold this run's largest batch "
            f"({needed} tokens); pass programs.pack_length_needed(...) of every member, or more."
        )


def _refuse_packing_on_mesh(pack_length: int | None) -> None:
    if pack_length:
        raise ConfigError(
            "Packed batches run on one device (a packed row cannot be split over the batch "
            "axes); train on a mesh with pack_length=None."
        )


def check_batch_split(mesh: Mesh, table: sharding_lib.Rules, batch_size: int) -> None:
    """ConfigError unless ``batch_size`` splits evenly over the batch axes of ``table``."""
    _MeshPlan.make(mesh, table, batch_size)


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

    def data_parallel(self, trainable: PyTree, frozen: PyTree, batch: Batch) -> bool:
        """Whether a step over these arguments is purely data parallel: ``batch`` split over
        the batch axes (more than one shard) and every parameter replicated by the rules."""
        ways = sharding_lib.batch_ways(self.mesh, self.rules)
        if ways == 1 or num_rows(batch) % ways or not jax.tree.leaves(trainable):
            return False
        shardings = jax.tree.leaves(self.tree((trainable, frozen)))
        return all(s.is_fully_replicated for s in shardings)

    def value_and_grad(
        self, objective: Callable, trainable: PyTree, frozen: PyTree, batch: Batch, dropout_rng
    ) -> tuple[jax.Array, PyTree]:
        """``jax.value_and_grad(objective)(trainable, frozen, batch, dropout_rng)`` with the
        gradient reduced over the batch shards by one all-reduce (in the adapters' float32).

        Where the step is purely data parallel (:meth:`data_parallel`) and draws no dropout
        masks, each device takes the gradient of the mean loss of its own rows (inside
        ``jax.shard_map`` over the mesh), and the gradients and the loss are summed across
        the batch shards in one ``psum`` and divided by their count: the mean loss's gradient
        over the whole batch (the loss is a mean over rows and each shard holds as many rows).
        Left to XLA, the reduction would follow the gradient's computation (one all-reduce
        per layer under the encoder's layer scan). Otherwise (parameters split over the mesh,
        or dropout: its masks are drawn for the whole batch) the plain gradient, reduced
        where XLA places it.
        """
        grad_fn = jax.value_and_grad(objective)
        if dropout_rng is not None or not self.data_parallel(trainable, frozen, batch):
            return grad_fn(trainable, frozen, batch, dropout_rng)
        axes = tuple(self.rules["batch"])
        ways = sharding_lib.batch_ways(self.mesh, self.rules)
        rows_spec = jax.sharding.PartitionSpec(axes)

        def local(trainable, frozen, batch):
            # Without the replication check (check_vma) this gradient is this device's own,
            # not yet summed: with it, JAX would sum each use of the replicated adapters
            # (pvary's transpose), which in the layer scan's backward pass also makes XLA copy
            # the stacked layer weights at every layer.
            loss, grads = grad_fn(trainable, frozen, batch, None)
            # One psum of every leaf and the loss: XLA's all-reduce combiner makes it one
            # all-reduce (a flat concatenated vector would cost a copy of the gradients).
            loss, grads = jax.lax.psum((loss, grads), axes)
            return loss / ways, jax.tree.map(lambda g: g / ways, grads)

        spec = jax.sharding.PartitionSpec()
        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(spec, spec, {k: rows_spec for k in batch}),
            out_specs=(spec, spec),
            check_vma=False,
        )(trainable, frozen, dict(batch))

    def place(self, params: PyTree, frozen: PyTree, data: Batch) -> tuple:
        """Puts a program's arguments on the mesh (no copy for those already there): parameter
        trees by their logical axes, data over the batch axes (each process its own rows)."""
        return (
            sharding_lib.place(params, self.tree(params)),
            sharding_lib.place(frozen, self.tree(frozen)),
            sharding_lib.place_data(dict(data), self.mesh, self.rules),
        )


def _predict_fn(model_fn: ModelFn, batch_size: int, plan: _MeshPlan | None) -> Callable:
    """The traceable ``predict(trainable, frozen, data, pack_length) -> [N, K]`` of one member.

    On a mesh (``plan``) each block's rows are a multiple of the batch shards and split over
    them, so every device runs its share of the rows, not all of them.
    """
    ways = 1 if plan is None else sharding_lib.batch_ways(plan.mesh, plan.rules)

    def predict(trainable, frozen, data, pack_length):
        def run_block(b):
            if pack_length:
                b = packing.pack(b, pack_length)
            if plan is not None:
                b = plan.constrain_batch(b)
            return model_fn(trainable, frozen, b, None)

        return map_rows(run_block, data, batch_size, multiple=ways)

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
    ``rules``, each block's rows are rounded up to a multiple of the batch shards and split
    over them (1000 rows at ``batch_size=64`` on ``data=8``: 16 blocks of 64, 8 rows per device
    each), and the outputs are replicated.

    With ``by_length`` (one device only) the returned ``predict(trainable, frozen, data, *,
    packed=False)`` runs on the host side (no ``jax.vmap`` / ``jax.jit`` around it): rows of
    data with an ``attention_mask`` run sorted by token length, each group of blocks cut to its
    own longest row (:func:`lora_jax.rows.by_length`), outputs back in order: the same outputs
    with less padding computed. ``packed=True`` packs each block instead (for a ``model_fn``
    that reads packed rows): one shape, the padding left out of the dense layers.
    """
    on_mesh = _MeshPlan.make(mesh, rules, None)
    fn = _predict_fn(model_fn, batch_size, on_mesh)

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
    labels = data["labels"]
    if not outputs.is_fully_addressable:  # on several processes: every one reads them all
        outputs, labels = jnp.asarray(distributed.to_host(outputs)), distributed.to_host(labels)
    labels = jnp.broadcast_to(labels, outputs.shape[:-1])
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
    # the jitted program under predict: (trainable, frozen, data, shared, pack_length=None)
    predict_program: Callable | None = None


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
    and never for a new seed or learning rate, nor for another task's label words when they
    are member inputs (``lora_jax.trainable.label_words_as_inputs``) rather than constants of
    ``model_fn``.

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


def member_slots(
    mesh: Mesh | None, rules: sharding_lib.Rules | None, n: int, batch_size: int
) -> int:
    """How many members a job of ``n`` runs as on ``mesh``.

    ``n`` off a mesh, and for a job of one whose batch splits over the ``batch`` axes (it runs
    data parallel). Otherwise the members are split over the ``adapter`` axes, which split only
    a multiple of their size: ``n`` is rounded up to one, the extra members idle copies of
    member 0 (10 cells on ``data=16`` run as 16, a run of batch 8 on ``data=16`` as 16 copies),
    never silently replicated.
    """
    if mesh is None:
        return n
    table = sharding_lib.rules_for_mesh(mesh) if rules is None else dict(rules)
    if n == 1 and batch_size % sharding_lib.batch_ways(mesh, table) == 0:
        return 1
    ways = math.prod(mesh.shape[a] for a in table.get("adapter", ()))
    return -(-n // ways) * ways


def job_rules(mesh: Mesh, rules: sharding_lib.Rules | None, n: int) -> dict:
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
        rules = job_rules(mesh, dict(table), n)
        if n > 1:
            rules["batch"] = ()  # the members are split; each member's batch stays whole
        return _MeshPlan(mesh, rules)

    def chunk(state, frozen, data, length, shared, pack_length=None):
        plan = on_mesh(int(state.step.shape[0]))
        one = _chunk_fn(model_fn, optimizer, cfg, plan)
        one = functools.partial(one, length=length, pack_length=pack_length)
        state, losses = jax.vmap(one, in_axes=(0, frozen_axes, None if shared else 0))(
            state, frozen, data
        )
        if plan is not None:  # the losses are what every process reads: replicated
            state = jax.lax.with_sharding_constraint(state, plan.tree(state))
            losses = jax.lax.with_sharding_constraint(losses, plan.replicated)
        return state, losses

    def vpredict(trainable, frozen, data, shared, pack_length=None):
        plan = on_mesh(members.count(trainable))
        one = _predict_fn(model_fn, cfg.eval_batch_size, plan)
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
        jitted,
    )
