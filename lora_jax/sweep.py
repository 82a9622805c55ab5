"""Many training runs on one frozen base in one compiled program: a vectorized rank x seed sweep.

A sweep trains ``n`` *members* (adapter sets) at once. Every leaf of the training state gets a
leading member axis ``[n, ...]``, and :func:`lora_jax.train.make_train_chunk` 's chunk of steps
is ``jax.vmap`` -ed over the state and the data with the frozen base unbatched
(``in_axes=None``). For a base kernel ``W`` (in, out) and member activations ``x``
(n, B, T, in), vmap's ``dot_general`` rule folds the member axis into the rows, so XLA runs one
``(n B T, in) @ (in, out)`` GEMM per base kernel for all members, as one big batch would (use
the fused LoRA path: a merged kernel ``W + s A_i B_i`` differs per member and would be a batched
GEMM of n kernels). The base is an argument of the compiled program, never a constant.

Members are independent: member i's loss depends only on its own parameters and data, so the
vmapped gradient is the gradient of the sum of the member losses, and each member's optimizer
update (gradient clipping included) sees only its own gradient: clipping is per member, never a
global norm over the stack. Per member: the learning rate (kept in the optimizer state, see
:func:`make_optimizer`), the seed (adapter init and batch order), the training and dev data
(same shapes), and for LoRA the rank and scale. Different ranks are padded to the largest one;
a per-member factor (rank mask times the member's scale over the padded config's scale)
multiplies ``lora_a`` inside the model, so padded columns of ``A`` and rows of ``B`` get exactly
zero gradients and stay exactly zero under AdamW and SGD.

Example (three linear classifiers with their own data and learning rates, as one job):
  >>> import jax.numpy as jnp, numpy as np
  >>> from lora_jax import sweep, train
  >>> def model_fn(trainable, frozen, batch, dropout_rng):
  ...     return batch["x"] @ trainable["w"]  # (B, K)
  >>> xs = [np.random.default_rng(i).normal(size=(32, 4)).astype(np.float32) for i in range(3)]
  >>> datas = [{"x": x, "labels": (x[:, i] > 0).astype(np.int32)} for i, x in enumerate(xs)]
  >>> cfg = train.TrainConfig(steps=20, batch_size=8, eval_every=10)
  >>> w0 = sweep.stack([{"w": jnp.zeros((4, 2))}] * 3)  # leaves (n, ...)
  >>> state = sweep.init_states(w0, cfg, learning_rates=[0.1, 0.2, 0.3], seeds=[0, 1, 2])
  >>> results = sweep.fit(model_fn, state, {}, datas, datas, cfg, progress=False)
  >>> [r.best_dev_accuracy > 0.9 for r in results]
  [True, True, True]

LoRA members of different ranks on one encoder (``output_fn`` from :mod:`lora_jax.readout`)::

    plan = sweep.plan_lora(params, [LoraConfig(r=1, alpha=2), LoraConfig(r=12, alpha=24)])
    state = sweep.init_states(sweep.init_lora(params, plan, [13, 21]), cfg, [3e-4] * 2, [13, 21])
    fn = make_model_fn(output_fn, "lora", lora_config=plan.config, fused=True)
    results = sweep.fit(sweep.lora_model_fn(fn), state, params, [train0, train1], [dev0, dev1],
                        cfg, member_inputs=plan.factors)
    best = [sweep.unpad(plan, r.best_trainable, i) for i, r in enumerate(results)]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from lora_jax import checkpoint, lora, packing, rows, train
from lora_jax import sharding as sharding_lib
from lora_jax.errors import ConfigError
from lora_jax.losses import Loss, get_loss

PyTree = Any
Batch = Mapping[str, jax.Array]

__all__ = [
    "LoraSweep",
    "MemberRateState",
    "evaluate",
    "fit",
    "init_lora",
    "init_states",
    "lora_model_fn",
    "make_optimizer",
    "member",
    "plan_lora",
    "programs",
    "scale_by_member_rate",
    "stack",
    "unpad",
]


# -- stacking -----------------------------------------------------------------------------------


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stacks same-structured pytrees on a new leading member axis: leaves ``[n, ...]``."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def member(tree: PyTree, i: int) -> PyTree:
    """Member ``i`` of a stacked pytree (leaves ``[n, ...]`` -> ``[...]``)."""
    return jax.tree.map(lambda x: x[i], tree)


# -- optimizer with a per-member learning rate ----------------------------------------------------


class MemberRateState(NamedTuple):
    """The learning rate of one member, carried in its optimizer state."""

    rate: jax.Array  # shape=(), float32


def scale_by_member_rate(rate: float) -> optax.GradientTransformation:
    """Multiplies updates by ``rate``, which ``init`` stores in the state (one value per member).

    The update function reads the rate from the state, so one compiled update serves members
    with different rates: the vmapped state holds ``rate`` [n].
    """

    def init_fn(params):
        del params
        return MemberRateState(jnp.asarray(rate, jnp.float32))

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: u * state.rate.astype(u.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    cfg: train.TrainConfig, learning_rate: float | None = None
) -> optax.GradientTransformation:
    """:func:`lora_jax.train.make_optimizer` at peak rate 1, then the member's own rate.

    The schedule, warmup, clipping and accumulation are ``cfg`` 's; the peak learning rate
    (``learning_rate``, default ``cfg.learning_rate``) multiplies the final update. For optax's
    AdamW and SGD this is the same update as ``train.make_optimizer`` with that peak rate (they
    end with a multiplication by -rate; with a constant schedule the results are bit-identical).
    """
    rate = cfg.learning_rate if learning_rate is None else learning_rate
    base = train.make_optimizer(dataclasses.replace(cfg, learning_rate=1.0))
    if isinstance(base, optax.MultiSteps):
        base = base.gradient_transformation()
    return optax.chain(base, scale_by_member_rate(rate))


def init_states(
    trainables: PyTree,
    cfg: train.TrainConfig,
    learning_rates: Sequence[float],
    seeds: Sequence[int],
) -> train.TrainState:
    """Stacked fresh states: member i gets ``trainables[i]``, ``learning_rates[i]``, ``seeds[i]``.

    Args:
      trainables: stacked trainable parameters, leaves ``[n, ...]`` (e.g. :func:`init_lora`).
      cfg: shared hyperparameters (its ``learning_rate`` and ``seed`` are not used).
      learning_rates: ``n`` peak learning rates.
      seeds: ``n`` seeds of batch order and dropout (as ``TrainConfig.seed``).
    """
    n = _num_members(trainables)
    if not len(learning_rates) == len(seeds) == n:
        raise ConfigError(
            f"init_states got {n} members but {len(learning_rates)} learning rates and "
            f"{len(seeds)} seeds; give one of each per member."
        )
    return stack(
        [
            train.init_state(member(trainables, i), make_optimizer(cfg, lr), seed)
            for i, (lr, seed) in enumerate(zip(learning_rates, seeds, strict=True))
        ]
    )


def _num_members(tree: PyTree) -> int:
    return int(jax.tree.leaves(tree)[0].shape[0])


# -- LoRA members: padded ranks, per-member scale -----------------------------------------------


class LoraSweep(NamedTuple):
    """LoRA members padded to one shape.

    Attributes:
      configs: each member's own ``LoraConfig``.
      config: the padded config the stacked adapters fit: per module the largest rank of any
        member, and the scale of member 0.
      factors: module path -> ``[n, r_pad]``: member i's rank mask (1 for its first ``r_i``
        columns, 0 after) times its scale over the padded config's scale. It multiplies
        ``lora_a`` in :func:`lora_model_fn`.
      ranks: per member, module path -> its rank ``r_i``.
    """

    configs: tuple[lora.LoraConfig, ...]
    config: lora.LoraConfig
    factors: dict[str, jax.Array]
    ranks: tuple[dict[str, int], ...]


def _structure(cfg: lora.LoraConfig) -> lora.LoraConfig:
    """The config without what may differ between members (rank, alpha, scaling rule)."""
    return dataclasses.replace(
        cfg, r=1, alpha=1.0, rank_pattern=(), alpha_pattern=(), use_rslora=False
    )


def plan_lora(params: Mapping, configs: Sequence[lora.LoraConfig]) -> LoraSweep:
    """Pads members' LoRA configs to one adapter shape (see :class:`LoraSweep`).

    Members may differ in ``r``, ``alpha``, ``rank_pattern``, ``alpha_pattern`` and
    ``use_rslora``; everything else (targets, bias, modules_to_save, init, dropout) must agree.

    Raises:
      ConfigError: no configs, or configs that differ in anything else.
    """
    configs = tuple(configs)
    if not configs:
        raise ConfigError("plan_lora needs at least one LoraConfig (one per member).")
    for i, cfg in enumerate(configs[1:], 1):
        if _structure(cfg) != _structure(configs[0]):
            fields = [
                f.name
                for f in dataclasses.fields(cfg)
                if getattr(_structure(cfg), f.name) != getattr(_structure(configs[0]), f.name)
            ]
            raise ConfigError(
                f"LoRA sweep members must differ only in r, alpha, rank_pattern, alpha_pattern "
                f"and use_rslora; member {i} differs from member 0 in {fields}. Fix: run "
                "those members in separate sweeps."
            )
    plans = [lora.resolve(params, cfg).lora for cfg in configs]
    r_pad = {p: max(plan[p].r for plan in plans) for p in plans[0]}
    scale0 = {p: t.scale for p, t in plans[0].items()}
    padded = dataclasses.replace(
        configs[0],
        r=max(r_pad.values()),
        alpha=1.0,
        use_rslora=False,
        rank_pattern=tuple((re.escape(p), r) for p, r in r_pad.items()),
        alpha_pattern=tuple((re.escape(p), scale0[p] * r) for p, r in r_pad.items()),
    )
    pad_plan = lora.resolve(params, padded).lora
    factors = {
        p: jnp.asarray(
            [
                (np.arange(r_pad[p]) < plan[p].r) * (plan[p].scale / pad_plan[p].scale)
                for plan in plans
            ],
            jnp.float32,
        )
        for p in r_pad
    }
    ranks = tuple({p: t.r for p, t in plan.items()} for plan in plans)
    return LoraSweep(configs, padded, factors, ranks)


def init_lora(params: Mapping, sweep: LoraSweep, seeds: Sequence[int]) -> lora.Adapters:
    """Stacked adapters: member i is ``lora.init(jax.random.key(seeds[i]), params, configs[i])``,
    zero-padded to the sweep's ranks. Leaves ``[n, ...]``."""
    if len(seeds) != len(sweep.configs):
        raise ConfigError(f"init_lora got {len(seeds)} seeds for {len(sweep.configs)} members.")
    members = []
    for seed, cfg in zip(seeds, sweep.configs, strict=True):
        adapters = lora.init(jax.random.key(seed), params, cfg)
        for path, leaves in adapters.items():
            if "lora_a" in leaves:
                r = sweep.factors[path].shape[1]
                a, b = leaves["lora_a"], leaves["lora_b"]
                leaves["lora_a"] = jnp.pad(a, ((0, 0), (0, r - a.shape[1])))  # (in, r_pad)
                leaves["lora_b"] = jnp.pad(b, ((0, r - b.shape[0]), (0, 0)))  # (r_pad, out)
        members.append(adapters)
    return stack(members)


def unpad(sweep: LoraSweep, adapters: lora.Adapters, i: int) -> lora.Adapters:
    """Member ``i`` 's padded adapters (e.g. ``FitResult.best_trainable``) cut to its own ranks,
    so that they fit ``sweep.configs[i]`` (for ``lora.apply``, saving, PEFT export)."""
    out = dict(adapters)
    for path, r in sweep.ranks[i].items():
        out[path] = dict(
            out[path], lora_a=out[path]["lora_a"][:, :r], lora_b=out[path]["lora_b"][:r]
        )
    return out


def lora_model_fn(model_fn: train.ModelFn) -> train.ModelFn:
    """Wraps a ``model_fn`` over adapters of ``sweep.config`` for LoRA members.

    Returns ``fn(adapters, (base, factors), batch, dropout_rng)`` that multiplies each
    ``lora_a`` (in, r_pad) by the member's factor [r_pad] and calls ``model_fn(adapters, base,
    batch, dropout_rng)``. ``model_fn`` may be any model over the padded config: the fused LoRA
    model of ``trainable.make_model_fn(..., fused=True)`` (which shares the base GEMMs across
    members) or ``ntk.lora_linearized_model_fn(output_fn, sweep.config)``.
    """

    def fn(adapters, frozen, batch, dropout_rng):
        base, factors = frozen
        folded = {
            path: dict(
                leaves, lora_a=leaves["lora_a"] * factors[path].astype(leaves["lora_a"].dtype)
            )
            if "lora_a" in leaves
            else leaves
            for path, leaves in adapters.items()
        }
        return model_fn(folded, base, batch, dropout_rng)

    fn.packs_rows = getattr(model_fn, "packs_rows", False)
    return fn


# -- compiled programs ----------------------------------------------------------------------------


class Programs(NamedTuple):
    """Compiled programs of one sweep (model_fn, config)."""

    chunk: Callable  # (state [n], frozen, data [n], length, pack) -> (state, losses [n, length])
    predict: Callable  # (trainable [n], frozen, data [n] or shared, *, pack) -> [n, N, K]


def programs(
    model_fn: train.ModelFn,
    cfg: train.TrainConfig,
    *,
    member_inputs: bool,
    shared_data: bool,
    by_length: bool = True,
) -> Programs:
    """Vectorized :func:`lora_jax.train.make_train_chunk` and ``make_predict``, built once.

    ``frozen`` is passed unbatched; with ``member_inputs`` it is the pair ``(frozen,
    member_inputs)`` with the second part batched. ``shared_data``: ``predict`` 's data is the
    same for every member (unbatched, e.g. a common test set). ``by_length``: ``predict`` runs
    the rows of data with an ``attention_mask`` sorted by token length, each group cut to its
    longest row (:func:`lora_jax.rows.by_length`; each member's rows sorted on their own), and
    returns the outputs in order: same outputs, less padding; host-side, not traceable. Its
    ``pack=True`` packs each block instead (:mod:`lora_jax.packing`).
    """
    cfg = dataclasses.replace(cfg, seed=0)
    return _programs(model_fn, cfg, member_inputs, shared_data, by_length)


@functools.lru_cache(maxsize=16)
def _programs(model_fn, cfg, member_inputs: bool, shared_data: bool, by_length: bool) -> Programs:
    frozen_axes = (None, 0) if member_inputs else None
    chunk = train.make_train_chunk(model_fn, make_optimizer(cfg), cfg)
    predict = train.make_predict(model_fn, cfg.eval_batch_size)

    def vchunk(state, frozen, data, length=None, pack=0):
        one = functools.partial(chunk, length=length, pack=pack)
        return jax.vmap(one, in_axes=(0, frozen_axes, 0))(state, frozen, data)

    data_axes = None if shared_data else 0

    @functools.cache
    def vpredict_packed(length: int) -> Callable:
        one = functools.partial(predict, pack=length)
        return jax.jit(jax.vmap(one, in_axes=(0, frozen_axes, data_axes)))

    vpredict = vpredict_packed(0)

    def sorted_predict(trainable, frozen, data, *, pack=False):
        if "attention_mask" not in data:
            return vpredict(trainable, frozen, data)
        if pack:  # every member's blocks packed to the longest any member's block needs
            train.check_packs_rows(model_fn)
            length = packing.block_length(data["attention_mask"], cfg.eval_batch_size)
            return vpredict_packed(length)(trainable, frozen, data)
        return rows.by_length(
            lambda part: vpredict(trainable, frozen, part),
            data,
            cfg.eval_batch_size,
            members=not shared_data,
            out_axis=1,
            copies=_num_members(trainable) if shared_data else 1,  # every member runs each row
        )

    return Programs(
        jax.jit(vchunk, donate_argnums=0, static_argnames=("length", "pack")),
        sorted_predict if by_length else vpredict,
    )


def evaluate(
    predict: Callable, trainable: PyTree, frozen: PyTree, data: Batch, loss: Loss | str = Loss.CE
) -> dict[str, np.ndarray]:
    """Per-member accuracy and loss ``[n]`` of a vectorized ``predict`` on ``data``.

    ``data`` is stacked (labels ``[n, N]``) or shared (labels ``[N]``), as ``predict`` expects.
    """
    outputs = predict(trainable, frozen, data)  # (n, N, K)
    labels = jnp.broadcast_to(data["labels"], outputs.shape[:2])  # (n, N)
    accuracy = jnp.mean(jnp.argmax(outputs, -1) == labels, axis=-1)
    return {
        "accuracy": np.asarray(accuracy),
        "loss": np.asarray(jax.vmap(get_loss(loss))(outputs, labels)),
    }


def _stack_data(
    datas: Sequence[Batch], n: int, split: str, batch_size: int | None = None
) -> dict[str, jax.Array]:
    if len(datas) != n:
        raise ConfigError(f"sweep.fit got {len(datas)} {split} sets for {n} members; one each.")
    for i, data in enumerate(datas):
        size = int(np.shape(data["labels"])[0])
        if batch_size is not None and size < batch_size:
            raise ConfigError(
                f"Member {i}'s training set has {size} examples, fewer than "
                f"batch_size={batch_size}; lower TrainConfig.batch_size or give it more data."
            )
    shapes = [{k: tuple(np.shape(v)) for k, v in d.items()} for d in datas]
    for i, s in enumerate(shapes):
        if s != shapes[0]:
            raise ConfigError(
                f"Members' {split} sets differ in shape (member 0: {shapes[0]}, member {i}: {s}); "
                "the members of one sweep need equally many examples of one length. Fix: pad "
                "the sequences to one length, or run differently sized members in separate sweeps."
            )
    return stack([{k: jnp.asarray(v) for k, v in d.items()} for d in datas])


def _along_members(tree: PyTree, mesh: sharding_lib.Mesh, table: sharding_lib.Rules) -> PyTree:
    """Every leaf ``[n, ...]`` of ``tree`` split over the mesh on its leading (member) axis."""

    def one(x):
        axes = ("adapter",) + (None,) * (np.ndim(x) - 1)
        spec = sharding_lib.spec(axes, np.shape(x), mesh, table, where="sweep members")
        return jax.device_put(x, sharding_lib.NamedSharding(mesh, spec))

    return jax.tree.map(one, tree)


def _select(pick: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """Per member: ``new`` where ``pick`` [n] is True, else ``old`` (leaves ``[n, ...]``)."""
    return jax.tree.map(
        lambda a, b: jnp.where(pick.reshape(pick.shape + (1,) * (a.ndim - 1)), a, b), new, old
    )


# -- the loop -----------------------------------------------------------------------------------


def fit(
    model_fn: train.ModelFn,
    state: train.TrainState,
    frozen: PyTree,
    train_data: Sequence[Batch],
    dev_data: Sequence[Batch],
    cfg: train.TrainConfig,
    *,
    member_inputs: PyTree | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    metrics_paths: Sequence[str | os.PathLike] | None = None,
    progress: bool | str = True,
    mesh: sharding_lib.Mesh | None = None,
    rules: sharding_lib.Rules | None = None,
    pack: bool = False,
) -> list[train.FitResult]:
    """Trains all members for ``cfg.steps`` as one job; per member what :func:`train.fit` gives.

    Each member keeps its own best-dev parameters (ties: the earlier step). Given the same
    inputs, member i's losses, best step and parameters are those of ``train.fit`` on member i
    alone (to float rounding). With ``checkpoint_dir`` the stacked state is saved at every
    evaluation and a later call resumes from it.

    Args:
      model_fn: ``(trainable, frozen, batch, dropout_rng) -> [B, K]`` for one member; with
        ``member_inputs`` it receives ``frozen`` as ``(frozen, member_inputs[i])``
        (:func:`lora_model_fn`).
      state: stacked initial state (:func:`init_states`); ignored when resuming.
      frozen: parameters shared by all members, passed once and unbatched.
      train_data: one dict of ``[N_train, ...]`` arrays (with ``labels``) per member; all of
        one shape.
      dev_data: one dict of ``[N_dev, ...]`` arrays per member; all of one shape.
      cfg: shared hyperparameters (``learning_rate`` and ``seed`` are per member, in ``state``).
      member_inputs: per-member inputs that are not trained, leaves ``[n, ...]`` (for LoRA
        members ``LoraSweep.factors``).
      checkpoint_dir: where to save / resume; None disables checkpoints.
      metrics_paths: one JSONL file per member to append its evaluation records to.
      progress: show a tqdm bar over members x steps (a string is used as its description).
      mesh: lay the members along a mesh axis: every stacked array (state, data, member
        inputs) is split on its leading member axis by the ``adapter`` rule of ``rules``
        (default ``sharding.rules("adapter")``: over ``data``), the base is replicated, and XLA
        partitions the vectorized program accordingly. One process.
      rules: the rule table for ``mesh``.
      pack: train on packed batches (:mod:`lora_jax.packing`, as ``train.fit`` 's ``pack``):
        every member's batch packed to the longest any member draws; dev evaluated packed
        too. One device.

    Returns:
      One :class:`lora_jax.train.FitResult` per member.

    Raises:
      ConfigError: a member's training set is smaller than the batch, or members' data differ
        in shape or number.
    """
    n = int(state.step.shape[0])
    train_stacked = _stack_data(train_data, n, "training", cfg.batch_size)
    dev_stacked = _stack_data(dev_data, n, "dev")
    chunk, predict = programs(
        model_fn,
        cfg,
        member_inputs=member_inputs is not None,
        shared_data=False,
        by_length=mesh is None,
    )
    args = frozen if member_inputs is None else (frozen, member_inputs)
    packed = 0
    if pack:
        if mesh is not None:
            raise ConfigError("sweep.fit(pack=True) runs on one device; pass mesh=None.")
        packed = max(
            train.pack_length(model_fn, state.rng[i], cfg.steps, data, cfg.batch_size)
            for i, data in enumerate(train_data)
        )

    state = jax.tree.map(jnp.copy, state)  # the chunks donate their state
    best = jax.tree.map(jnp.copy, state.trainable)
    log = {"best_accuracy": [-1.0] * n, "best_step": [0] * n, "history": [[] for _ in range(n)]}
    if checkpoint_dir is not None:
        restored = checkpoint.restore(checkpoint_dir, {"state": state, "best": best})
        if restored is not None:
            state, best, log = restored.tree["state"], restored.tree["best"], restored.meta
    if mesh is not None:
        table = sharding_lib.rules("adapter") if rules is None else rules
        state, best, train_stacked, dev_stacked, member_inputs = (
            _along_members(t, mesh, table)
            for t in (state, best, train_stacked, dev_stacked, member_inputs)
        )
        frozen = jax.device_put(frozen, sharding_lib.replicated(mesh))
        args = frozen if member_inputs is None else (frozen, member_inputs)

    dev_predict = functools.partial(predict, pack=True) if pack else predict
    start = int(state.step[0])
    bar = tqdm(
        total=n * cfg.steps,
        initial=n * start,
        desc=progress if isinstance(progress, str) else "sweep",
        disable=not progress,
        unit="member-step",
        leave=False,
    )
    for length in train.chunk_lengths(cfg.steps, cfg.eval_every, start):
        state, losses = chunk(state, args, train_stacked, length, packed)  # losses: (n, length)
        step = int(state.step[0])
        dev = evaluate(dev_predict, state.trainable, args, dev_stacked, cfg.loss)
        train_loss = np.asarray(jnp.mean(losses, axis=1))
        improved = np.array([dev["accuracy"][i] > log["best_accuracy"][i] for i in range(n)])
        if improved.any():
            best = _select(jnp.asarray(improved), state.trainable, best)
        for i in range(n):
            record = {
                "step": step,
                "train_loss": float(train_loss[i]),
                "dev_accuracy": float(dev["accuracy"][i]),
                "dev_loss": float(dev["loss"][i]),
            }
            if improved[i]:
                log["best_accuracy"][i], log["best_step"][i] = record["dev_accuracy"], step
            log["history"][i].append(record)
            if metrics_paths is not None:
                with open(metrics_paths[i], "a") as f:
                    f.write(json.dumps(record) + "\n")
        if checkpoint_dir is not None:
            checkpoint.save(checkpoint_dir, step, {"state": state, "best": best}, log)
        bar.update(n * length)
        bar.set_postfix(
            loss=f"{float(train_loss.mean()):.3f}", dev=f"{float(dev['accuracy'].mean()):.3f}"
        )
    bar.close()
    return [
        train.FitResult(
            member(state, i),
            member(best, i),
            log["best_step"][i],
            log["best_accuracy"][i],
            log["history"][i],
        )
        for i in range(n)
    ]
