"""Splits padded only to their longest row, and evaluation sorted by length, change no result.

Oracles: the same runs on batches encoded at T = max_length (``tasks.encode(pad_to=
"max_length")``, the padding every split had before), each member of a vectorized job trained
alone on its own split lengths, plain (unsorted) evaluation, and a hand-computed row function.
A tiny random BERT with its own tokenizer; TREC questions (label words of its vocabulary),
k = 4, fp32.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sweep import _assert_same, _assert_same_fit

from experiments.config import ExperimentConfig
from experiments.workbench import TaskData, Workbench
from lora_jax import lora, members, programs, rows, tasks, train
from lora_jax.testing import make_tiny_checkpoint
from lora_jax.trainable import Method, make_model_fn

MAX_LENGTH, K, TEST_CAP = 48, 4, 32
TCFG = train.TrainConfig(steps=6, eval_every=2, batch_size=4, eval_batch_size=8, learning_rate=3e-2)
LORA = lora.LoraConfig(r=2, alpha=4.0, targets="query|value")


@pytest.fixture(autouse=True)
def every_length_its_own_group(monkeypatch):
    """Tiny data would save too little to be split by length (``rows.MIN_SAVING``): split it
    anyway, so that the sorted evaluations here run several groups."""
    monkeypatch.setattr(rows, "MIN_SAVING", 0)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "bert", model_type="bert")
    cfg = ExperimentConfig(
        model=str(path), tasks=("trec",), k=K, max_length=MAX_LENGTH, test_cap=TEST_CAP
    )
    words = ("description", "entity", "abbreviation", "human", "location", "number")
    return Workbench(cfg, {"trec": dataclasses.replace(tasks.get_task("trec"), label_words=words)})


def _full_padding(bench: Workbench, seed: int) -> TaskData:
    """The seed's splits encoded at T = max_length (independent of ``Workbench.data``)."""
    task = bench.task("trec")
    splits = tasks.few_shot_splits(task, k=K, seed=seed, test_cap=TEST_CAP)

    def encode(examples):
        batch = tasks.encode(
            examples,
            bench.tokenizer,
            task,
            max_length=MAX_LENGTH,
            word_style=bench.word_style,
            pad_to="max_length",
        )
        return {k: jnp.asarray(v) for k, v in batch.items()}

    return TaskData(encode(splits.train), encode(splits.dev), encode(splits.test))


def _width(split: dict) -> int:
    return split["input_ids"].shape[1]


def _fit(model_fn, adapters, params, data, seed):
    cfg = train.TrainConfig(**{**TCFG.__dict__, "seed": seed})
    state = train.init_state(adapters, train.make_optimizer(cfg), seed)
    return train.fit(model_fn, state, params, data.train, data.dev, cfg, progress=False)


def test_splits_padded_to_their_longest_row_train_and_predict_as_at_full_padding(bench):
    output_fn, params = bench.prompt_model("trec")
    short, full = bench.data("trec", 42, "prompt"), _full_padding(bench, 42)
    for s, f in zip(short, full, strict=True):
        width = _width(s)
        assert width % 8 == 0 and width < MAX_LENGTH  # trimmed
        lengths = np.asarray(s["attention_mask"]).sum(1)
        assert width - 8 < lengths.max() <= width
        # The same tokens (truncation unchanged); full padding only adds masked columns.
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            np.testing.assert_array_equal(s[key], f[key][:, :width])
        assert not np.asarray(f["attention_mask"])[:, width:].any()
        np.testing.assert_array_equal(s["mask_pos"], f["mask_pos"])

    model_fn = make_model_fn(output_fn, Method.LORA, lora_config=LORA)
    adapters = lora.init(jax.random.key(42), params, LORA)
    got, want = (_fit(model_fn, adapters, params, d, 42) for d in (short, full))
    assert len({h["dev_loss"] for h in want.history}) == 3  # the adapters did change
    _assert_same_fit(got, want, rtol=1e-5, param_rtol=1e-5)
    plain = programs.make_predict(model_fn, 8)
    np.testing.assert_allclose(
        plain(want.best_trainable, params, short.test),
        plain(want.best_trainable, params, full.test),
        rtol=1e-5,
        atol=1e-6,
    )


def test_vectorized_job_of_members_with_different_lengths_equals_each_member_alone(bench):
    output_fn, params = bench.prompt_model("trec")
    seeds = [13, 21, 42]
    own = [bench.data("trec", s, "prompt") for s in seeds]
    job = bench.job_data("trec", seeds, "prompt")
    for split in ("train", "dev"):
        widths = [_width(getattr(d, split)) for d in own]
        assert len(set(widths)) > 1  # the members' own lengths differ
        assert {_width(getattr(d, split)) for d in job} == {max(widths)}
    assert all(d.test is own[0].test for d in job)

    configs = [lora.LoraConfig(r=r, alpha=2.0 * r, targets="query|value") for r in (1, 2, 1)]
    plan = lora.plan_stack(params, configs)
    state = train.init_states(
        lora.init_stack(params, plan, seeds), TCFG, [TCFG.learning_rate] * 3, seeds
    )
    fused = make_model_fn(output_fn, Method.LORA, lora_config=plan.config, fusion="fused")
    vec_fn = lora.with_member_factors(fused)
    vec = train.fit_job(
        vec_fn,
        state,
        params,
        [d.train for d in job],
        [d.dev for d in job],
        TCFG,
        member_inputs=plan.factors,
        progress=False,
    )
    seq_fns = [
        make_model_fn(output_fn, Method.LORA, lora_config=c, fusion="fused") for c in configs
    ]
    seq = [
        _fit(f, lora.init(jax.random.key(s), params, c), params, d, s)
        for f, c, s, d in zip(seq_fns, configs, seeds, own, strict=True)
    ]
    _assert_same(vec, plan, seq, rtol=1e-5, atol=1e-6)

    # The job's test predictions (shared test set, sorted by length) are each member's own.
    best = members.stack([r.best_trainable for r in vec])
    predict = programs.job_programs(vec_fn, TCFG, member_inputs=True).predict
    outputs = predict(best, (params, plan.factors), own[0].test)  # (3, N, K)
    for i, (f, s) in enumerate(zip(seq_fns, seq, strict=True)):
        want = programs.make_predict(f, 8)(s.best_trainable, params, _full_padding(bench, 13).test)
        np.testing.assert_allclose(outputs[i], want, rtol=1e-5, atol=1e-6)


def test_by_length_sorts_groups_and_restores_the_order():
    # A row function computed by hand: 10 * (attended tokens) + x, on rows of lengths
    # 17, 3, 9, 5, 9 (T = 24), in blocks of at most 2: sorted 3 5 | 9 9 | 17 -> T 8, 16, 24.
    mask = np.zeros((5, 24), np.int32)
    for i, n in enumerate([17, 3, 9, 5, 9]):
        mask[i, :n] = 1
    calls = []

    def fn(batch):
        calls.append(batch["attention_mask"].shape)
        return 10 * batch["attention_mask"].sum(-1) + batch["x"]

    data = {"attention_mask": mask, "x": np.arange(5)}
    np.testing.assert_array_equal(rows.by_length(fn, data, 2), [170, 31, 92, 53, 94])
    assert calls == [(2, 8), (2, 16), (1, 24)]

    # A group that saves fewer row-tokens than min_saving joins the next: the rows of 9 tokens
    # would save 2 rows x 8 tokens = 16 as their own group, so at 20 they run at T = 24.
    calls.clear()
    out = rows.by_length(fn, data, 2, min_saving=20)
    np.testing.assert_array_equal(out, [170, 31, 92, 53, 94])
    assert calls == [(2, 8), (3, 24)]
    calls.clear()  # counted twice (copies=2): 32 row-tokens >= 20, the group is kept
    rows.by_length(fn, data, 2, min_saving=20, copies=2)
    assert calls == [(2, 8), (2, 16), (1, 24)]

    # Members: each member's rows sorted on their own; a block's length is the longest of all.
    calls.clear()
    stacked = {"attention_mask": np.stack([mask, mask[::-1]]), "x": np.arange(10).reshape(2, 5)}
    out = rows.by_length(fn, stacked, 2, members=True)
    np.testing.assert_array_equal(out, [[170, 31, 92, 53, 94], [95, 56, 97, 38, 179]])
    assert calls == [(2, 2, 8), (2, 2, 16), (2, 1, 24)]

    # Rows on another output axis (a vectorized predict of shared data: [n, N]).
    out = rows.by_length(lambda b: jnp.stack([fn(b), -fn(b)]), data, 2, out_axis=1)
    np.testing.assert_array_equal(out, [[170, 31, 92, 53, 94], [-170, -31, -92, -53, -94]])


def test_sorted_evaluation_equals_unsorted_evaluation(bench):
    output_fn, params = bench.prompt_model("trec")
    test = bench.data("trec", 13, "prompt").test
    lengths = np.sort(rows.token_lengths(test["attention_mask"]))
    assert len(rows.length_groups(lengths, 8, _width(test))) > 1  # blocks of 8 rows, 2+ lengths
    model_fn = make_model_fn(output_fn, Method.LORA, lora_config=LORA)
    adapters = jax.tree.map(lambda x: x + 0.05, lora.init(jax.random.key(0), params, LORA))
    sorted_predict = programs.make_predict(model_fn, 8, by_length=True)
    np.testing.assert_allclose(
        sorted_predict(adapters, params, test),
        programs.make_predict(model_fn, 8)(adapters, params, test),
        rtol=1e-5,
        atol=1e-6,
    )

    # Vectorized (sorted per member): stacked data whose members' rows are in different orders,
    # and shared data, against each member's unsorted one-run predict.
    plan = lora.plan_stack(params, [LORA, LORA])
    stacked_adapters = jax.tree.map(lambda x: x + 0.05, lora.init_stack(params, plan, [0, 1]))
    fn = make_model_fn(output_fn, Method.LORA, lora_config=plan.config, fusion="fused")
    member_datas = [test, jax.tree.map(lambda x: x[::-1], test)]
    unsorted = programs.make_predict(fn, 8)
    for data, datas in ((members.stack(member_datas), member_datas), (test, [test, test])):
        got = programs.job_programs(fn, TCFG).predict(stacked_adapters, params, data)
        for i, d in enumerate(datas):
            want = unsorted(members.member(stacked_adapters, i), params, d)
            np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
