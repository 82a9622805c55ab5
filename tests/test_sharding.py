"""Sharding: rule tables, meshes, logical axes of LoRA factors, and runs on 8 simulated devices.

The multi-device runs execute in a subprocess (``tests/_mesh_runs.py``) with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before jax starts; their oracle is the
same run on one device.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _env import simulated_devices
from jax.sharding import PartitionSpec as P

from lora_jax import lora, models
from lora_jax import params as params_lib
from lora_jax import sharding as sh

HERE = os.path.dirname(__file__)


def test_presets_join_and_name_every_logical_axis():
    table = sh.rules("dp+fsdp+tp")
    assert set(table) == set(sh.LOGICAL_AXES)
    assert table["batch"] == ("data", "fsdp")
    assert table["embed"] == ("fsdp",)
    assert table["heads"] == table["mlp"] == table["vocab"] == ("tensor",)
    assert table["lora_rank"] == ()  # the rank is never split
    assert sh.rules("dp")["embed"] == ()
    with pytest.raises(ValueError, match="Unknown sharding preset 'zero3'"):
        sh.rules("dp+zero3")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=4,model=2", "Unknown mesh axis 'model'"),
        ("data=four", "needs a size >= 1"),
        ("data=2,data=2", "appears twice"),
        ("", "names no axis"),
    ],
)
def test_bad_mesh_strings_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        sh.parse_mesh(spec)


def test_mesh_size_must_match_the_devices():
    n = jax.device_count()
    with pytest.raises(ValueError, match=f"has {4 * n} devices but {n} are present"):
        sh.make_mesh(f"data={4 * n}")
    mesh = sh.make_mesh(f"data={n}")
    assert dict(mesh.shape) == {"data": n}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_rules_naming_missing_mesh_axes_or_unknown_names_are_errors():
    mesh = sh.make_mesh("data=1")
    with pytest.raises(ValueError, match="names mesh axis 'tensor', which the mesh"):
        sh.check_rules(sh.rules("tp"), mesh)
    table = sh.rules_for_mesh(mesh)
    with pytest.raises(ValueError, match="has logical axis 'length', which has no sharding rule"):
        sh.spec(("batch", "length"), (4, 4), mesh, table)
    with pytest.raises(ValueError, match="shards two of its dimensions"):
        sh.spec(("batch", "embed"), (4, 4), mesh, {**table, "embed": ("data",)})


def test_lora_factors_inherit_their_kernels_axes(tiny_encoder_config):
    _, params = models.split(models.create(tiny_encoder_config, head="mlm"))
    cfg = lora.LoraConfig(r=2, alpha=4, targets="query|value|dense|decoder")
    adapters = lora.init(jax.random.key(0), params, cfg)
    flat_base = params_lib.flatten(models.logical_axes(params))
    adapter_axes = lora.logical_axes(adapters)
    assert len(adapters) >= 9
    for path in adapters:
        kernel_in, kernel_out = flat_base[f"{path}.kernel"]
        assert adapter_axes[path]["lora_a"] == (kernel_in, "lora_rank")
        assert adapter_axes[path]["lora_b"] == ("lora_rank", kernel_out)
    # Hand-written names of the kinds of kernel (MaxText/Megatron layout).
    layer = "roberta.encoder.layer.0"
    assert flat_base[f"{layer}.attention.self.query.kernel"] == ("embed", "heads")
    assert flat_base[f"{layer}.attention.output.dense.kernel"] == ("heads", "embed")
    assert flat_base[f"{layer}.intermediate.dense.kernel"] == ("embed", "mlp")
    assert flat_base[f"{layer}.output.dense.kernel"] == ("mlp", "embed")
    assert flat_base["roberta.embeddings.word_embeddings.embedding"] == ("vocab", "embed")
    # A stack of sweep members on a leading axis.
    assert sh.leaf_axes(f"{layer}.attention.self.query.lora_a", 3) == (
        "adapter",
        "embed",
        "lora_rank",
    )


def test_optimizer_state_leaves_take_the_names_of_the_parameters_they_mirror():
    adapters = {"enc.layer.0.attention.self.query": {"lora_a": jnp.zeros((8, 2))}}
    mesh = sh.make_mesh("data=1")
    import optax

    state = optax.adam(1e-3).init(adapters)
    shardings = sh.tree_shardings(state, mesh, {**sh.rules("dp"), "embed": ("data",)})
    mu = shardings[0].mu["enc.layer.0.attention.self.query"]["lora_a"]
    assert mu.spec == P("data", None)
    assert shardings[0].count.spec == P()


def test_uneven_dimensions_are_replicated_with_a_warning():
    mesh = sh.make_mesh("data=1")
    with pytest.warns(UserWarning, match="not divisible"):
        # A 2-way split needs a mesh of 2: fake one with the rules of a 1-device mesh by hand.
        sh.spec(("vocab",), (5,), _FakeMesh({"tensor": 2}), {"vocab": ("tensor",)})
    assert sh.spec(("vocab",), (5,), mesh, sh.rules("dp")) == P(None)


class _FakeMesh:
    def __init__(self, shape):
        self.shape = shape
        self.axis_names = tuple(shape)


def test_describe_lists_every_leaf_with_bytes_per_device(tiny_encoder_config):
    _, params = models.split(models.create(tiny_encoder_config, head="mlm"))
    mesh = sh.make_mesh("data=1")
    text = sh.describe(params, mesh, sh.rules_for_mesh(mesh))
    n_leaves = len(jax.tree.leaves(params))
    assert text.count("\n| roberta.") + text.count("\n| lm_head.") == n_leaves
    total = sum(int(np.size(x)) * 4 for x in jax.tree.leaves(params))
    assert f"total {total:,} bytes per device, {total:,} of them in replicated" in text
    # Largest first: the word embeddings (50 x 16) lead.
    assert text.splitlines()[3].startswith("| roberta.embeddings.word_embeddings.embedding")


def test_lora_does_not_import_models():
    import ast
    import pathlib

    root = pathlib.Path(HERE).parent / "lora_jax"
    for path in [*(root / "lora").glob("*.py"), root / "sharding.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith("lora_jax.models") for n in names), (path, names)


@pytest.fixture(scope="module")
def mesh_runs():
    env = simulated_devices(8)
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "_mesh_runs.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def _assert_same_run(ref, run):
    np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-6)
    np.testing.assert_allclose(run["dev_loss"], ref["dev_loss"], rtol=1e-6)
    assert run["trainable"].keys() == ref["trainable"].keys()
    # Adam divides by sqrt(v): where a gradient is ~0, reduction-order noise (1e-7) becomes a
    # visible part of a 1e-2 step; 1e-5 is 0.1% of one step.
    for path, value in ref["trainable"].items():
        np.testing.assert_allclose(run["trainable"][path], value, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data=8", "data=4,fsdp=2", "data=2,fsdp=2,tensor=2"])
def test_lora_on_a_mesh_equals_one_device(mesh_runs, mesh):
    _assert_same_run(mesh_runs["lora/None"], mesh_runs[f"lora/{mesh}"])
    assert mesh_runs[f"lora/{mesh}"]["state_matches_rules"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "head", "ntk"])
def test_full_head_and_linearized_training_on_a_mesh_equal_one_device(mesh_runs, method):
    mesh = "data=2,fsdp=2,tensor=2"
    _assert_same_run(mesh_runs[f"{method}/None"], mesh_runs[f"{method}/{mesh}"])
    assert mesh_runs[f"{method}/{mesh}"]["state_matches_rules"]


@pytest.mark.slow
def test_shardings_are_what_the_rules_say(mesh_runs):
    run = mesh_runs["lora/data=2,fsdp=2,tensor=2"]
    q = "['roberta.encoder.layer.0.attention.self.query']"
    o = "['roberta.encoder.layer.0.output.dense']"
    # Hand-written: kernel (embed, heads) -> (fsdp, tensor), so A (fsdp, -) and B (-, tensor).
    assert run["state_specs"][f".trainable{q}['lora_a']"] == "('fsdp', None)"
    assert run["state_specs"][f".trainable{q}['lora_b']"] == "(None, 'tensor')"
    assert run["state_specs"][f".trainable{o}['lora_a']"] == "('tensor', None)"
    assert run["state_specs"][f".trainable{o}['lora_b']"] == "(None, 'fsdp')"
    adam_mu = [k for k in run["state_specs"] if k.endswith(f"mu{q}['lora_b']")]
    assert adam_mu and run["state_specs"][adam_mu[0]] == "(None, 'tensor')"
    frozen = run["frozen_specs"]
    layer = "['roberta']['encoder']['layer'][0]"
    assert frozen[f"{layer}['attention']['self']['query']['kernel']"] == "('fsdp', 'tensor')"
    assert frozen[f"{layer}['output']['dense']['kernel']"] == "('tensor', 'fsdp')"
    assert frozen["['roberta']['embeddings']['word_embeddings']['embedding']"] == (
        "('tensor', 'fsdp')"
    )
    assert frozen[f"{layer}['output']['LayerNorm']['scale']"] == "('fsdp',)"


@pytest.mark.slow
def test_sharded_adapters_saved_as_peft_load_with_the_same_logits(mesh_runs):
    run = mesh_runs["lora/data=2,fsdp=2,tensor=2"]
    trained = {k.replace("']['", ".").strip("[']") for k in run["trainable"]}
    assert run["peft_keys"] == sorted(trained)  # no adapter key lost at save
    np.testing.assert_allclose(run["peft_logits"], run["mesh_logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data=8", "data=4,fsdp=2", "data=2,fsdp=2,tensor=2"])
def test_rows_the_mesh_does_not_divide_are_split_not_replicated(mesh_runs, mesh):
    run = mesh_runs[f"lora/{mesh}"]
    np.testing.assert_allclose(run["odd_mesh_logits"], run["odd_logits"], rtol=1e-5, atol=1e-6)


def test_blocks_round_up_to_the_devices_they_are_split_over():
    from lora_jax.rows import even_blocks

    assert even_blocks(1000, 64) == (16, 63)
    assert even_blocks(1000, 64, multiple=8) == (16, 64)  # 8 rows per device of data=8
    assert even_blocks(13, 16, multiple=8) == (1, 16)
    assert even_blocks(13, 16, multiple=4) == (1, 16)
    assert even_blocks(9, 4, multiple=2) == (3, 4)


@pytest.mark.slow
def test_batch_not_divisible_by_the_data_axes_is_an_error(mesh_runs):
    assert mesh_runs["batch_error"] == (
        "batch_size=6 is not divisible by the 8 batch shards of the mesh (data x fsdp=8); "
        "use a multiple of 8."
    )
