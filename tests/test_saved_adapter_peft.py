"""``--save-adapters`` output in PEFT, against tests/golden/saved_adapter (see
tests/golden/make_saved_adapter_golden.py): an adapter directory written by the CLI, loaded by
transformers + PEFT, which filled task.json's template and read the label-word logits at the mask.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora, models, tasks
from lora_jax.readout import make_output_fn

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "saved_adapter")
BASE, ADAPTER = os.path.join(GOLDEN, "base"), os.path.join(GOLDEN, "adapter")
TOL = 1e-5  # float32, logits of size ~0.1


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(ADAPTER, "task.json")) as f:
        info = json.load(f)
    return info, np.load(os.path.join(GOLDEN, "io.npz"))


def _label_logits(params, apply_fn, info, io):
    batch = {
        "input_ids": jnp.asarray(io["input_ids"], jnp.int32),
        "attention_mask": jnp.asarray(io["attention_mask"], jnp.int32),
        "mask_pos": jnp.asarray(io["mask_pos"], jnp.int32),
    }
    output_fn = make_output_fn(apply_fn, info["readout"], info["label_word_ids"])
    return np.asarray(jax.jit(output_fn)(params, batch))


def test_saved_adapter_in_peft_gives_our_logits(golden):
    info, io = golden
    assert np.abs(io["peft_logits"] - io["base_logits"]).max() > 100 * TOL  # the adapter matters
    # from_pretrained(adapter=...) merges the adapter, as PEFT's merge_and_unload would.
    model = models.from_pretrained(BASE, head=info["head"], adapter=ADAPTER)
    apply_fn, params = models.split(model)
    np.testing.assert_allclose(
        _label_logits(params, apply_fn, info, io), io["peft_logits"], atol=TOL
    )
    # load_peft + apply, with the LoRA factors kept separate.
    apply_fn, base = models.split(models.from_pretrained(BASE, head=info["head"]))
    np.testing.assert_allclose(_label_logits(base, apply_fn, info, io), io["base_logits"], atol=TOL)
    adapters, cfg = lora.load_peft(ADAPTER)
    fused = lora.apply(base, adapters, cfg, fusion="fused")
    np.testing.assert_allclose(
        _label_logits(fused, apply_fn, info, io), io["peft_logits"], atol=TOL
    )


def test_task_json_template_means_the_same_prompt_to_both(golden):
    """Our encoding of the golden sentences (through the task file) is the token sequence PEFT's
    side built from task.json's template with plain string replacement."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_saved_adapter_golden", os.path.join(GOLDEN, "..", "make_saved_adapter_golden.py")
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    info, io = golden
    task = tasks.load_task_file(os.path.join(GOLDEN, "task", "reviews.json"))
    assert (task.template, list(task.label_words)) == (info["template"], info["label_words"])
    examples = tasks.Examples(texts=(tuple(script.SENTENCES),), labels=np.zeros(4, np.int32))
    ours = tasks.encode(
        examples, models.load_tokenizer(BASE), task, max_length=24, word_style=info["word_style"]
    )
    for row in range(len(script.SENTENCES)):
        n = int(io["attention_mask"][row].sum())
        np.testing.assert_array_equal(ours["input_ids"][row][:n], io["input_ids"][row][:n])
        assert int(ours["mask_pos"][row]) == int(io["mask_pos"][row])


def test_readme_loading_example_runs_on_a_saved_adapter(golden, monkeypatch):
    """The README's "Your own data" lora-jax snippet, pointed at the golden adapter, reproduces
    the test accuracy the run recorded in task.json."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        section = f.read().split("## Your own data", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert '"runs/reviews/adapters/reviews_lora-r4_seed13"' in code and '"reviews.json"' in code
    code = code.replace("runs/reviews/adapters/reviews_lora-r4_seed13", ADAPTER)
    code = code.replace('"reviews.json"', repr(os.path.join(GOLDEN, "task", "reviews.json")))
    monkeypatch.chdir(root)  # task.json names the base model relative to the repository
    scope = {"__name__": "readme"}
    exec(compile(code, "README.md", "exec"), scope)
    info, _ = golden
    logits, labels = np.asarray(scope["logits"]), np.asarray(scope["batch"]["labels"])
    assert logits.shape == (len(labels), 2)
    assert float(np.mean(logits.argmax(-1) == labels)) == info["test_accuracy"]
