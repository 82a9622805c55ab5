"""The optax training loop: one host loop over a job of ``n`` runs (members); a run is a job of one.

The model is any ``model_fn(trainable, frozen, batch, dropout_rng) -> outputs [B, K]``: LoRA
adapters over a frozen base, all weights, only a head, or a linearized model from ``ntk`` all
train through the same loop. Every leaf of a job's :class:`TrainState` has a leading member axis
``[n, ...]`` (:mod:`lora_jax.members`), and the compiled chunk of steps
(:func:`lora_jax.programs.job_programs`) is ``jax.vmap`` -ed over it with the frozen base
unbatched. Members are independent: each has its own parameters, learning rate (in its
optimizer state, :mod:`lora_jax.optim`), seed (batch order and dropout), data, and gradient
clipping. Data stays on the device as a dict of ``[N, ...]`` arrays (shared by all members) or
one dict per member; the batches come from the step counter, so the loop keeps no host-side
state and a resumed run sees exactly the batches an uninterrupted run would.

The loop, :func:`fit_job`, runs ``eval_every`` steps as one compiled call, then evaluates on dev,
keeps each member's best parameters, calls the callbacks (e.g. :func:`write_metrics`) and saves
a checkpoint; :func:`fit` is a job of one.

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
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from lora_jax import checkpoint, distributed, members, programs
from lora_jax import sharding as sharding_lib
from lora_jax.errors import ConfigError
from lora_jax.losses import Loss
from lora_jax.optim import Optimizer, Schedule, make_optimizer
from lora_jax.programs import Batch, ModelFn, TrainState

PyTree = Any

__all__ = [
    "Evaluation",
    "FitResult",
    "Optimizer",
    "Schedule",
    "TrainConfig",
    "TrainState",
    "chunk_lengths",
    "fit",
    "fit_job",
    "init_state",
    "init_states",
    "job_shardings",
    "make_optimizer",
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
      train_dropout: run dropout during training: the model's own (at its checkpoint's
        rates) and, for LoRA, ``LoraConfig.dropout`` on the LoRA branches (a rate: another idea,
        hence another name).
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
    train_dropout: bool = False
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


def init_state(trainable: PyTree, optimizer: Any, seed: int) -> TrainState:
    """Fresh state of one run at step 0 (``optimizer``: the ``optax.GradientTransformation`` of
    :func:`make_optimizer` for its config)."""
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
        who = names[i] if not isinstance(data, Mapping) else " / ".join(names)
        programs.check_batch_fits(int(np.shape(d["labels"])[0]), batch_size, who)
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
    """Puts ``tree`` on the mesh: on :func:`job_shardings`."""
    if mesh is None or tree is None:
        return tree
    return sharding_lib.place(tree, job_shardings(tree, mesh, table, data=data, shared=shared))


def job_shardings(tree: PyTree, mesh: Mesh, table: dict, *, data: bool = False, shared=True):
    """Where :func:`fit_job` puts ``tree`` (leaves may be ``jax.ShapeDtypeStruct``):
    parameter trees by their logical axes, shared data over the batch axes, per-member data
    over the ``adapter`` axes."""
    if not data:
        return sharding_lib.tree_shardings(tree, mesh, table)
    if shared:
        if table["batch"]:
            return sharding_lib.data_shardings(dict(tree), mesh, table)
        return jax.tree.map(lambda _: sharding_lib.replicated(mesh), tree)
    axes = lambda x: ("adapter",) + (None,) * (np.ndim(x) - 1)  # noqa: E731
    return jax.tree.map(
        lambda x: NamedSharding(
            mesh, sharding_lib.spec(axes(x), np.shape(x), mesh, table, where="job members")
        ),
        tree,
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
    test_data: Batch | Sequence[Batch] | None = None,
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
      test_data: evaluated with each member's best parameters at the end (``FitResult.test``):
        one dict shared by all members, or one per member (e.g. the test set of each member's
        task). Each distinct dict (by identity: give members that share a set the same dict)
        is evaluated once by the whole job, and each member keeps its own set's result.
      names: a name per member for messages (e.g. ``mr/lora-r1/seed13``).
      checkpoint_dir: where to save / resume; None disables checkpoints.
      callbacks: called with an :class:`Evaluation` after each dev evaluation (e.g.
        :func:`write_metrics`).
      progress: show a tqdm bar over member-steps (a string is used as its description).
      mesh: run on this mesh (see :mod:`lora_jax.sharding`), placed by ``rules`` (default
        ``rules_for_mesh(mesh)``): a job of one whose batch the ``batch`` axes split is data
        parallel (parameters by their logical axes); any other job splits its members over the
        ``adapter`` axes (``data`` by default), each member's batch whole beside it, the base
        placed by its logical axes, and padded with idle copies of member 0 to a multiple of
        those axes (:func:`lora_jax.programs.member_slots`). The mesh may span several
        processes: every process calls with the same arguments (its own copy of the data) and
        fills the shards of its own devices. A checkpoint resumes on a mesh with as many
        member shards.
      rules: the logical-axis rule table.
      pack_length: train on packed batches of this many tokens (:mod:`lora_jax.packing`; at
        least :func:`pack_length` of every member), so padding costs no compute; dev and test
        are evaluated packed too. Needs a ``model_fn`` that reads packed batches and one device.
        None: padded batches.

    Returns:
      One :class:`FitResult` per member.

    Raises:
      ConfigError: a training set smaller than the batch, members' data that differ in shape
        or number, or packing on a mesh.
    """
    n = int(state.step.shape[0])
    if names is None:
        names = [""] if n == 1 else [f"member {i}" for i in range(n)]
    train_arrays, shared_train = _member_data(train_data, n, "training", names, cfg.batch_size)
    dev_arrays, shared_dev = _member_data(dev_data, n, "dev", names)
    programs.check_pack_length(
        model_fn,
        pack_length,
        mesh=mesh,
        rngs=state.rng,
        steps=cfg.steps,
        datas=[train_data] * n if isinstance(train_data, Mapping) else train_data,
        batch_size=cfg.batch_size,
    )
    # On a mesh the members split over the devices in equal parts: idle copies fill the last.
    slots = programs.member_slots(mesh, rules, n, cfg.batch_size)
    state, member_inputs = members.pad(state, slots), members.pad(member_inputs, slots)
    train_arrays = train_arrays if shared_train else members.pad(train_arrays, slots)
    dev_arrays = dev_arrays if shared_dev else members.pad(dev_arrays, slots)
    compiled = programs.job_programs(
        model_fn, cfg, member_inputs=member_inputs is not None, mesh=mesh, rules=rules
    )
    table = None if mesh is None else programs.job_rules(mesh, rules, slots)
    if mesh is not None and slots == 1:
        programs.check_batch_split(mesh, table, cfg.batch_size)
    place = functools.partial(_place, mesh=mesh, table=table)
    # Arrays spanning several processes pass only through compiled programs (the same on
    # every process), never through eager ops.
    state = _copy(place(state))  # the chunks donate their state
    best = _copy(state.trainable)
    log = {"best_accuracy": [-1.0] * n, "best_step": [0] * n, "history": [[] for _ in range(n)]}
    if checkpoint_dir is not None:
        restored = checkpoint.restore(checkpoint_dir, {"state": state, "best": best})
        if restored is not None:
            state, best, log = restored.tree["state"], restored.tree["best"], restored.meta
    base = place(frozen)
    args = base if member_inputs is None else (base, place(member_inputs))
    train_arrays = place(train_arrays, data=True, shared=shared_train)
    dev_arrays = place(dev_arrays, data=True, shared=shared_dev)
    predict = functools.partial(compiled.predict, packed=pack_length is not None)

    start = int(distributed.to_host(state.step)[0])
    bar = tqdm(
        total=n * cfg.steps,
        initial=n * start,
        desc=progress if isinstance(progress, str) else "train",
        disable=not progress,
        unit="member-step" if n > 1 else "step",
        leave=False,
    )
    for length in chunk_lengths(cfg.steps, cfg.eval_every, start):
        state, losses = compiled.chunk(
            state, args, train_arrays, length, shared=shared_train, pack_length=pack_length
        )
        step = int(distributed.to_host(state.step)[0])
        dev = programs.evaluate(predict, state.trainable, args, dev_arrays, cfg.loss)
        train_loss = np.mean(distributed.to_host(losses), axis=1)[:n]
        evaluation = _evaluation(step, train_loss, {k: v[:n] for k, v in dev.items()}, log)
        if any(evaluation.improved):
            # New arrays (jnp.where), so the next chunk's donation of the state leaves them.
            pick = np.zeros(slots, bool)
            pick[:n] = evaluation.improved
            pick = _place(pick, mesh, table, data=True, shared=False)
            best = _select(pick, state.trainable, best)
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
        test = _test_members(
            lambda d: programs.evaluate(predict, best, args, place(d, data=True), cfg.loss),
            test_data,
            n,
        )
    if not all(x.is_fully_addressable for x in jax.tree.leaves((state, best))):
        state, best = distributed.to_host((state, best))  # collective: every process gathers
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


def _test_members(evaluate: Callable, test_data: Batch | Sequence[Batch], n: int) -> dict:
    """``{"accuracy": [n], "loss": [n]}``: each member's result on its own test set.

    ``test_data`` is one set shared by all members, or one per member; each distinct set (by
    identity) is evaluated once by all members (``evaluate(arrays)`` gives ``[slots]``
    arrays) and each member keeps the results of its own.
    """
    datas = [test_data] * n if isinstance(test_data, Mapping) else list(test_data)
    if len(datas) != n:
        raise ConfigError(f"fit_job got {len(datas)} test sets for {n} members; one each.")
    out = {"accuracy": np.zeros(n), "loss": np.zeros(n)}
    for data in {id(d): d for d in datas}.values():
        result = evaluate({k: jnp.asarray(v) for k, v in data.items()})
        mine = [i for i, d in enumerate(datas) if d is data]
        for k in out:
            out[k][mine] = np.asarray(result[k])[mine]
    return out


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
_select = jax.jit(members.select)


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
