"""Kernels with rows split over the ``data`` axis of 8 simulated CPU devices (and parameters
over ``fsdp`` on a 4 x 2 mesh) equal one device's.

The runs happen in a subprocess (tests/_ntk_mesh_run.py) started with 8 simulated devices.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from _env import simulated_devices
from jax.sharding import AxisType

import ntk
from lora_jax.errors import ConfigError
from ntk import planning

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def runs():
    env = simulated_devices(8)
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "_ntk_mesh_run.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize(
    "case",
    [
        "asigngd-fused",
        "asigngd-blocks",
        "signgd-self-blocks",
        "sgd-structured",
        "asigngd-fsdp-blocks",
    ],
)
def test_kernel_on_8_devices_equals_one_device(runs, case):
    run = runs[case]
    mesh, one = np.asarray(run["mesh"]), np.asarray(run["one"])
    assert mesh.shape == one.shape and mesh.ndim == 4
    np.testing.assert_allclose(mesh, one, rtol=1e-10, atol=1e-10)
    assert 8 in run["devices"]  # the programs really ran on the mesh
    assert "data" in run["axes"]  # rows split
    assert ("fsdp" in run["axes"]) == ("fsdp" in case)  # parameters split only when asked


@pytest.mark.parametrize(
    "case, programs",
    [
        # 10 x 12 rows in blocks of (3, 5), rounded up to the 8 devices: 2 blocks a side.
        ("planned-asigngd", [["jacobian x2 (8 rows)", 2], ["cross x1 (8 rows) x 2 kept", 2]]),
        ("planned-sgd", [["block, STRUCTURED_DERIVATIVES (8 x 8 rows)", 4]]),
        # All weights on the 4 x 2 mesh, tables compacted: blocks of (4, 8) rows.
        (
            "planned-all-compacted",
            [["jacobian x2 (8 rows)", 2], ["cross x1 (4 rows) x 2 kept", 3]],
        ),
    ],
)
def test_planned_programs_compute_the_kernel(runs, case, programs):
    """The programs ntk.planning lists for a kernel on the mesh (what experiments.plan --ntk
    compiles for a pod), run block by block on 8 devices, give one device's kernel."""
    run = runs[case]
    assert run["programs"] == programs
    np.testing.assert_allclose(run["mesh"], run["one"], rtol=1e-10, atol=1e-10)


def test_planned_all_weights_kernel_compacts_the_tables(runs):
    """The all-weights kernel is planned on tables cut as ntk.compact cuts them (the word
    table to 512 of its 1,100 rows, the positions to T + 2 = 14 of 24); run on them, the
    programs give one device's dense-table kernel (the case above). With the weights split
    over fsdp each Gram product is one matrix product, and each Jacobian matrix keeps its
    columns over fsdp (rows over data); on CPU devices otherwise, column slices."""
    assert runs["planned-all-compacted"]["layout"] == {
        "data": [4096, ["data", "None"]],
        "fsdp": [None, ["data", "fsdp"]],
    }
    tables = runs["planned-all-compacted"]["tables"]
    assert tables == {
        "roberta.embeddings.word_embeddings.embedding": [512, 1100],
        "roberta.embeddings.position_embeddings.embedding": [14, 24],
    }


def test_planning_refuses_auto():
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,))
    x = {"x": jax.ShapeDtypeStruct((4, 3), np.float32)}
    with pytest.raises(ConfigError, match="implementation=AUTO chooses by compiling"):
        planning.kernel_programs(
            lambda b, p, x: x["x"] @ p, {}, jax.ShapeDtypeStruct((3, 2), np.float32), x, None,
            mesh=mesh, implementation=ntk.NtkImplementation.AUTO,
        )  # fmt: skip


def test_mesh_without_the_data_axis_is_refused():
    mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(AxisType.Explicit,))
    with pytest.raises(ConfigError, match="no 'data' to split kernel rows over"):
        ntk.empirical_ntk_fn(lambda p, x: x["x"] @ p, mesh=mesh)
