"""lora_jax.checkpoint: local paths and epath URLs (gs://...), save and restore."""

import jax.numpy as jnp
import numpy as np
from etils import epath

from lora_jax import checkpoint


def test_a_url_is_kept_and_a_local_path_made_absolute(tmp_path, monkeypatch):
    # os.path.abspath("gs://b/run") is "<cwd>/gs:/b/run": checkpoints on a bucket never resumed.
    path = checkpoint.checkpoint_path("gs://bucket/run/ckpt")
    assert str(path) == "gs://bucket/run/ckpt"
    monkeypatch.chdir(tmp_path)
    assert checkpoint.checkpoint_path("ckpt") == epath.Path(tmp_path / "ckpt")


def test_save_and_restore_through_epath_and_relative_paths(tmp_path, monkeypatch):
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(3, jnp.int32)}
    target = {"w": jnp.zeros((2, 3)), "step": jnp.asarray(0, jnp.int32)}
    assert checkpoint.restore(epath.Path(tmp_path / "none"), target) is None
    checkpoint.save(epath.Path(tmp_path / "a"), 3, tree, {"best": [0.5]})
    got = checkpoint.restore(str(tmp_path / "a"), target)
    assert got.step == 3 and got.meta == {"best": [0.5]}
    np.testing.assert_array_equal(got.tree["w"], tree["w"])
    monkeypatch.chdir(tmp_path)
    checkpoint.save("b", 5, tree, {})
    checkpoint.save("b", 7, tree, {})  # keeps the latest only
    assert checkpoint.restore(epath.Path(tmp_path / "b"), target).step == 7
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.isdigit()) == ["7"]
