"""Subprocess body of tests/test_ntk_mesh.py: kernels with rows split over 8 simulated devices.

Run as ``python tests/_ntk_mesh_run.py`` with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(set by the test before jax starts); prints one JSON object: per case, the kernel on the mesh
and on one device (float64 lists), and the device counts of the programs that ran.
"""

import json

import jax
import numpy as np
from jax.sharding import AxisType

import ntk
from lora_jax import lora, models
from lora_jax import params as params_lib
from lora_jax.readout import make_output_fn
from lora_jax.rows import take_rows
from ntk import _jacobians, _programs, planning
from ntk.compact import compact_block


def _layout(lay):
    """A :class:`ntk._jacobians.Layout` as JSON: its Gram slices and the Jacobians' spec."""
    return [lay.chunk, [str(a) for a in lay.sharding.spec]]


def flat_rows(params, path):
    """Rows of the table at ``path`` in ``params``."""
    return params_lib.flatten(params)[path].shape[0]


def problem():
    cfg = models.EncoderConfig(
        model_type="roberta",
        vocab_size=1100,  # above ntk.compact.ROW_BUCKET: the word table is compacted
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=24,
        type_vocab_size=1,
        pad_token_id=1,
    )
    apply_fn, params = models.split(models.create(cfg, head="mlm", dtype=np.float64))
    output_fn = make_output_fn(apply_fn, "mlm", np.array([5, 9], np.int32))
    lcfg = lora.LoraConfig(r=2, alpha=4.0, targets=("query", "value"))
    adapters = lora.init(jax.random.PRNGKey(0), params, lcfg)
    adapters = jax.tree.map(lambda a: a.astype(np.float64) + 0.05, adapters)  # B != 0
    return output_fn, params, adapters, lcfg


def batch(n, seed, t=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 40, size=(n, t)).astype(np.int32)
    mask = np.ones((n, t), np.int32)
    mask[::2, -6:] = 0
    ids[::2, -6:] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mask_pos": rng.integers(1, 5, n).astype(np.int32),
    }


def planned(mesh, g, base, params, x1, x2, size, impl, kernel, fsdp_axis=None, compacted=None,
            embedding_rows=None):  # fmt: skip
    """The kernel computed by running the programs ``ntk.planning.kernel_programs`` lists for
    ``f(p, x) = g(base, p, x)`` (``base`` an argument), assembled block by block; and their
    names and runs. With ``compacted`` the tables are cut as the kernel cuts them for all the
    rows (``ntk.compact.compact_block``, with the model's ``embedding_rows``), and the
    programs planned from ``compacted`` (``{path: rows}``)."""
    spec = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)  # noqa: E731
    progs = planning.kernel_programs(
        g, spec(base), spec(params), spec(x1), spec(x2), mesh=mesh, trace_axes=(),
        vmap_axes=0, implementation=impl, batch_size=size, kernel=kernel, fsdp_axis=fsdp_axis,
        compacted=compacted,
    )  # fmt: skip
    if compacted:
        params, (x1, x2) = compact_block(embedding_rows, params, [x1, x2], tuple(compacted))
    n1, n2 = len(x1["input_ids"]), len(x2["input_ids"])
    out = np.zeros((n1, n2, 2, 2))
    if len(progs) == 2:  # kept Jacobians of x2, then each block of x1 against them
        jac, cross = (p.compile() for p in progs)
        b2 = jac.out_info[0][0].shape[0]  # per leaf, K Jacobians [b2, P_leaf]
        b1 = cross.out_info[0].shape[0]  # per kept block, [b1, b2, K, K]
        kept = [jac(base, params, take_rows(x2, j, b2, n2)) for j in range(0, n2, b2)]
        for i in range(0, n1, b1):
            blocks = cross(base, params, take_rows(x1, i, b1, n1), kept)
            for j, block in zip(range(0, n2, b2), blocks, strict=True):
                r1, r2 = min(b1, n1 - i), min(b2, n2 - j)
                out[i : i + r1, j : j + r2] = np.asarray(block)[:r1, :r2]
    else:  # one program per (x1 block, x2 block)
        (exe,) = (p.compile() for p in progs)
        b1, b2 = exe.out_info.shape[:2]
        for i in range(0, n1, b1):
            for j in range(0, n2, b2):
                block = exe(base, take_rows(x1, i, b1, n1), take_rows(x2, j, b2, n2), params)
                r1, r2 = min(b1, n1 - i), min(b2, n2 - j)
                out[i : i + r1, j : j + r2] = np.asarray(block)[:r1, :r2]
    return out, [(p.name, p.runs) for p in progs]


def main():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    mesh2 = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    output_fn, params, adapters, lcfg = problem()
    lora_model = ntk.lora_kernel_model(output_fn, params, adapters, lcfg)
    all_model = ntk.kernel_model(output_fn, params, "all")  # compacted tables, padding cut
    x1, x2 = batch(10, 0), batch(12, 1)
    cases = {  # name: (model, kernel, x1, x2, batch_size, implementation[, fsdp])
        "asigngd-fused": (lora_model, "asigngd", x1, None, 16, 1),  # one program, 10 -> 16 rows
        "asigngd-blocks": (all_model, "asigngd", x1, x2, (3, 5), 1),  # rounded up to 8 rows
        "signgd-self-blocks": (lora_model, "signgd", x2, None, 8, 1),
        "sgd-structured": (lora_model, "sgd", x1, x2, 8, 3),  # nt's block programs
        "asigngd-fsdp-blocks": (all_model, "asigngd", x1, x2, (4, 8), 1, "fsdp"),
    }
    out = {}
    for name, ((f, sub, info), kernel, a, b, size, impl, *fsdp) in cases.items():
        kwargs = dict(
            trace_axes=(),
            vmap_axes=0,
            batch_size=size,
            model_info=info,
            kernel=kernel,
            implementation=impl,
        )
        _programs._PROGRAMS.clear()
        on = dict(mesh=mesh2, fsdp_axis="fsdp") if fsdp else dict(mesh=mesh)
        sharded = ntk.empirical_ntk_fn(f, **on, **kwargs)(a, b, sub)
        devices = sorted(
            {
                len(sharding.device_set)
                for _, exe in _programs._PROGRAMS.values()
                for sharding in jax.tree.leaves(exe.input_shardings)
            }
        )
        axes = sorted(  # the mesh axes the programs' inputs are split over
            {
                str(axis)
                for _, exe in _programs._PROGRAMS.values()
                for sharding in jax.tree.leaves(exe.input_shardings)
                for axis in getattr(sharding, "spec", ())
                if axis is not None
            }
        )
        single = ntk.empirical_ntk_fn(f, **kwargs)(a, b, sub)
        out[name] = {
            "mesh": sharded.tolist(),
            "one": single.tolist(),
            "devices": devices,
            "axes": axes,
        }
    # The programs experiments.plan compiles for a pod (ntk.planning), run here on the mesh:
    # the kept-Jacobian path, and nt's block programs (one device's kernel as sgd-structured).
    f, sub, info = lora_model
    kwargs = dict(trace_axes=(), vmap_axes=0, batch_size=(3, 5), model_info=info)
    asigngd = ntk.empirical_ntk_fn(f, kernel="asigngd", implementation=1, **kwargs)(x1, x2, sub)

    def g(base, a, x):
        return output_fn(lora.apply(base, a, lcfg), x)

    for name, kernel, size, impl, one in (
        ("asigngd", "asigngd", (3, 5), 1, asigngd.tolist()),
        ("sgd", "sgd", 8, 3, out["sgd-structured"]["one"]),
    ):
        k, progs = planned(mesh, g, params, adapters, x1, x2, size, impl, kernel)
        out[f"planned-{name}"] = {"mesh": k.tolist(), "one": one, "programs": progs}
    # All weights, tables compacted (planned from counts), parameters over fsdp: the programs
    # of the asigngd-fsdp-blocks case.
    f, sub, info = all_model
    ids = np.concatenate([np.ravel(x["input_ids"]) for x in (x1, x2)] + [info.embedding_rows])
    tables = planning.compacted_tables(sub, info.embedding_rows, len(np.unique(ids)), 12)
    k, progs = planned(
        mesh2, lambda _, p, x: f(p, x), {}, sub, x1, x2, (4, 8), 1, "asigngd", "fsdp", tables,
        info.embedding_rows,
    )  # fmt: skip
    out["planned-all-compacted"] = {
        "mesh": k.tolist(),
        "one": out["asigngd-fsdp-blocks"]["one"],
        "programs": progs,
        "tables": {p: [r, int(flat_rows(sub, p))] for p, r in tables.items()},
        "layout": {
            "data": _layout(_jacobians.layout(mesh, "data", None)),
            "fsdp": _layout(_jacobians.layout(mesh2, "data", "fsdp")),
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    # Here, not at import: pytest imports this file (--doctest-modules) into the test session.
    jax.config.update("jax_enable_x64", True)
    main()
