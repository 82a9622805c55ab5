"""CLI flags of devices and processes: one-line errors, a run on a mesh, remat, bf16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import report
from experiments.run import main
from lora_jax import lora, models
from lora_jax.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "roberta"))


def args(model, out, *extra):
    return [
        *("--model", model, "--out", str(out), "--tasks", "mr", "--methods", "lora"),
        *("--ranks", "1", "--seeds", "13", "--k", "4", "--steps", "4", "--eval-every", "2"),
        *("--batch-size", "4", "--max-length", "32", "--test-cap", "16", "--grad-accum", "2"),
        *extra,
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mesh", "data=64"], "Mesh data=64 has 64 devices but 1 are present"),
        (["--mesh", "data=1,model=1"], "Unknown mesh axis 'model'"),
        (["--mesh", "data=1", "--rules", "dp+tp"], "names mesh axis 'tensor', which the mesh"),
        (
            ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
            "--process-id 2 is out of range for --num-processes 2",
        ),
        (["--process-timeout", "0"], "--process-timeout 0 must be a positive number"),
    ],
)
def test_bad_device_flags_are_one_line_errors(tiny_roberta, tmp_path, flags, message):
    with pytest.raises(SystemExit) as err:
        main(args(tiny_roberta, tmp_path, "--name", "bad", *flags))
    text = str(err.value)
    assert text.startswith("error: ") and message in text and "\n" not in text
    assert not (tmp_path / "bad").exists()


def test_a_run_on_a_mesh_gives_the_results_of_a_plain_run(tiny_roberta, tmp_path):
    main(args(tiny_roberta, tmp_path, "--name", "plain"))
    main(args(tiny_roberta, tmp_path, "--name", "mesh", "--mesh", "data=1"))
    (plain,) = report.read_results(tmp_path / "plain" / "results.jsonl")
    (mesh,) = report.read_results(tmp_path / "mesh" / "results.jsonl")
    for key in ("dev_accuracy", "test_accuracy", "best_step", "trainable_params"):
        assert plain[key] == mesh[key], key


def test_remat_gives_the_same_gradients_and_bf16_keeps_fp32_master_weights(
    tiny_encoder_config,
):
    model = models.create(tiny_encoder_config, head="mlm", dtype=jnp.bfloat16)
    apply_fn, params = models.split(model)
    cfg = lora.LoraConfig(r=2, alpha=4, targets="query|value")
    adapters = lora.init(jax.random.key(0), params, cfg)
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # B != 0
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 50, size=(2, 8)), jnp.int32)

    def loss(a, remat):
        out = apply_fn(lora.apply(params, a, cfg), ids, remat=remat)
        return jnp.mean(out.astype(jnp.float32) ** 2)

    g_plain = jax.grad(loss)(adapters, False)
    g_remat = jax.grad(loss)(adapters, True)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(g_plain)} == {jnp.dtype("float32")}
    assert apply_fn(params, ids).dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
