"""Label words as an argument of the compiled programs (issue 25): two tasks of one shape
compile the training chunk once, with the outputs and training of the fixed-ids path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora, members, models, programs, train
from lora_jax.errors import ConfigError
from lora_jax.readout import make_output_fn
from lora_jax.testing import make_tiny_checkpoint
from lora_jax.trainable import Method, label_words_as_inputs, make_model_fn

# Two tasks of one shape (K = 2) with different label words.
WORDS = {"a": np.array([11, 42], np.int32), "b": np.array([57, 23], np.int32)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("lw") / "roberta")
    apply_fn, params = models.split(models.from_pretrained(path, head="mlm"))
    rng = np.random.default_rng(0)

    def data(n):
        ids = rng.integers(5, 100, size=(n, 12)).astype(np.int32)
        mask = np.ones((n, 12), np.int32)
        mask[::3, 9:] = 0  # some padded rows
        ids[::3, 9:] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mask_pos": rng.integers(1, 9, size=n).astype(np.int32),
            "labels": rng.integers(0, 2, size=n).astype(np.int32),
        }

    return apply_fn, params, {t: (data(16), data(8)) for t in WORDS}


def test_label_words_at_call_are_the_full_mlm_logits_at_the_label_words(tiny):
    apply_fn, params, datas = tiny
    batch = {k: v for k, v in datas["a"][0].items() if k != "labels"}
    full = np.asarray(apply_fn(params, batch["input_ids"], batch["attention_mask"]))  # (B, T, V)
    at_mask = full[np.arange(len(full)), batch["mask_pos"]]  # (B, V)
    model_fn = label_words_as_inputs(
        make_model_fn(make_output_fn(apply_fn, "mlm", label_words_at_call=True), Method.FULL)
    )
    compiled = jax.jit(model_fn)
    for words in WORDS.values():
        out = compiled(params, ({}, (jnp.asarray(words), None)), batch, None)
        np.testing.assert_allclose(out, at_mask[:, words], atol=1e-5)
    assert compiled._cache_size() == 1  # one program for both tasks' words


def test_two_tasks_share_one_training_chunk_and_train_as_with_fixed_words(tiny):
    apply_fn, params, datas = tiny
    cfg = train.TrainConfig(steps=6, batch_size=4, learning_rate=3e-2, eval_every=3)
    lcfg = lora.LoraConfig(r=2, alpha=4.0, targets="query|value")
    at_call = make_output_fn(apply_fn, "mlm", label_words_at_call=True)
    model_fn = label_words_as_inputs(make_model_fn(at_call, Method.LORA, lora_config=lcfg))
    compiled = programs.job_programs(model_fn, cfg, member_inputs=True)
    results = {}
    for task, words in WORDS.items():
        state = train.init_states(
            members.stack([lora.init(jax.random.key(0), params, lcfg)]), cfg, [3e-2], [0]
        )
        train_data, dev_data = datas[task]
        (results[task],) = train.fit_job(
            model_fn,
            state,
            params,
            train_data,
            dev_data,
            cfg,
            member_inputs=(jnp.asarray(words)[None], None),
            test_data=dev_data,
            progress=False,
        )
    # Both tasks ran the same compiled chunk (two chunk lengths would be two entries: 3 and 3
    # steps here, so one) and the same dev program.
    assert compiled.chunk._cache_size() == 1
    assert compiled.predict_program._cache_size() == 1

    for task, words in WORDS.items():  # the old path: each task's words fixed in its programs
        fixed = make_model_fn(make_output_fn(apply_fn, "mlm", words), Method.LORA, lora_config=lcfg)
        train_data, dev_data = datas[task]
        want = train.fit(
            fixed,
            train.init_state(
                lora.init(jax.random.key(0), params, lcfg), train.make_optimizer(cfg), 0
            ),
            params,
            train_data,
            dev_data,
            cfg,
            test_data=dev_data,
            progress=False,
        )
        got = results[task]
        assert got.best_step == want.best_step
        assert got.best_dev_accuracy == want.best_dev_accuracy
        assert got.test["accuracy"] == want.test["accuracy"]
        np.testing.assert_allclose(
            [r["train_loss"] for r in got.history],
            [r["train_loss"] for r in want.history],
            rtol=1e-5,
        )
        leaves = [jax.tree.leaves(r.best_trainable) for r in (got, want)]
        for a, b in zip(*leaves, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The tasks' words matter: their dev losses differ.
    assert results["a"].history[-1]["dev_loss"] != results["b"].history[-1]["dev_loss"]


def test_fixed_and_per_call_label_words_are_not_mixed(tiny):
    apply_fn, params, datas = tiny
    batch = datas["a"][0]
    with pytest.raises(ConfigError, match="not both"):
        make_output_fn(apply_fn, "mlm", WORDS["a"], label_words_at_call=True)
    with pytest.raises(ConfigError, match="takes its label words per call"):
        make_output_fn(apply_fn, "mlm", label_words_at_call=True)(params, batch)
    with pytest.raises(ConfigError, match="fixed label_word_ids"):
        make_output_fn(apply_fn, "mlm", WORDS["a"])(params, batch, label_word_ids=WORDS["b"])
