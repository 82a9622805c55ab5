"""JAX's persistent compilation cache, on for runs on accelerators (experiments.launch)."""

import os
import subprocess
import sys


def test_compilation_cache_is_written_where_asked_and_can_be_turned_off(tmp_path):
    """A run's programs land in the persistent compilation cache (a fresh process each, as a
    run starts); ``off`` writes nothing."""
    code = (
        "import sys, jax, jax.numpy as jnp\n"
        "from experiments import launch\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "print(launch.enable_compilation_cache(sys.argv[1]))\n"
        "print(float(jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((4, 4))).sum()))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("LORA_JAX_COMPILATION_CACHE", None)
    cache = tmp_path / "cache"
    outs = []
    for where in (str(cache), "off"):
        out = subprocess.run(
            [sys.executable, "-c", code, where], capture_output=True, text=True, env=env
        )
        assert out.returncode == 0, out.stderr[-2000:]
        outs.append(out.stdout.splitlines())
    assert outs[0][0] == str(cache) and outs[1][0] == "None"
    assert outs[0][1] == outs[1][1]
    assert len(list(cache.iterdir())) >= 1


def test_it_is_off_by_default_on_the_cpu_backend(monkeypatch):
    """On CPU, JAX rejects every entry it loads (jax-ml/jax#38445): no cache unless asked."""
    import jax

    from experiments import launch

    monkeypatch.delenv("LORA_JAX_COMPILATION_CACHE")
    assert jax.default_backend() == "cpu"
    assert launch.enable_compilation_cache() is None


def test_the_environment_turns_it_off_by_default_in_tests():
    from experiments import launch

    assert os.environ["LORA_JAX_COMPILATION_CACHE"] == "off"
    assert launch.enable_compilation_cache() is None
