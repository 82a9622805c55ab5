"""Golden file for ``--save-adapters`` (tests/test_saved_adapter_peft.py): PEFT loads an adapter
directory written by ``python -m experiments.run --save-adapters`` and classifies with it.

Regenerate, in this order, from the repository root (each stage is deterministic):

  1. uv run python tests/golden/make_saved_adapter_golden.py ours
       a tiny random RoBERTa with its tokenizer (lora_jax.testing.make_tiny_checkpoint):
       tests/golden/saved_adapter/base/; a task file and its CSV: .../task/; then the CLI
       trains LoRA r=2 on it with --save-adapters, and the cell's adapter directory is copied
       to .../adapter/ (adapter_config.json, adapter_model.safetensors, task.json).
  2. /work/torchvenv/bin/python tests/golden/make_saved_adapter_golden.py peft
       transformers + PEFT load base + adapter as a user would (AutoModelForMaskedLM,
       PeftModel.from_pretrained), fill task.json's template with SENTENCES, and record the
       label-word logits at the mask, with and without the adapter: .../io.npz.

Stage 2 needs torch + transformers + peft (a scratch venv, never the project's). Versions used:
torch 2.13.0+cpu, transformers 5.24.0, peft 0.21.2. All files together are about 130 kB.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile

import numpy as np

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "saved_adapter")
BASE, TASK_DIR, ADAPTER = (os.path.join(HERE, d) for d in ("base", "task", "adapter"))
POSITIVE = [
    "a great film",
    "it was good",
    "really great",
    "great story",
    "a good cast",
    "good music",
    "great ending",
    "really good",
    "the movie is good",
    "the plot is good",
]
NEGATIVE = [
    "a terrible film",
    "it was bad",
    "really terrible",
    "bad story",
    "a bad cast",
    "boring music",
    "terrible ending",
    "really bad",
    "the film is bad",
    "the plot is bad",
]
SENTENCES = ["the acting was great", "the story was a mess", "i liked it", "it was boring"]
TASK = {
    "name": "reviews",
    "train": "reviews.csv",
    "text_columns": ["text"],
    "label_names": ["negative", "positive"],
    "label_words": ["terrible", "great"],
    "template": "{0} It was {mask} .",
}  # fmt: skip


def stage_ours() -> None:
    from experiments.run import main
    from lora_jax.testing import make_tiny_checkpoint

    shutil.rmtree(HERE, ignore_errors=True)
    make_tiny_checkpoint(BASE, hidden=16, heads=2, intermediate=32, seed=0)
    os.makedirs(TASK_DIR)
    with open(os.path.join(TASK_DIR, "reviews.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for p, n in zip(POSITIVE, NEGATIVE, strict=True):
            writer.writerows([(p, "positive"), (n, "negative")])
    with open(os.path.join(TASK_DIR, "reviews.json"), "w") as f:
        json.dump(TASK, f, indent=2)
    root = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
    with tempfile.TemporaryDirectory() as out:
        os.chdir(root)  # so that the recorded base model path is relative to the repository
        main(["--model", os.path.relpath(BASE, root), "--out", out, "--name", "golden",
              "--task-file", os.path.join(TASK_DIR, "reviews.json"), "--methods", "lora",
              "--ranks", "2", "--seeds", "13", "--k", "3", "--steps", "8", "--eval-every", "4",
              "--batch-size", "4", "--lr", "3e-2", "--max-length", "24", "--test-cap", "8",
              "--save-adapters"])  # fmt: skip
        shutil.copytree(os.path.join(out, "golden", "adapters", "reviews_lora-r2_seed13"), ADAPTER)
    path = os.path.join(ADAPTER, "task.json")
    with open(path) as f:
        info = json.load(f)
    info["source"] = info["source"].replace(root + os.sep, "")  # no machine paths in the repo
    with open(path, "w") as f:
        json.dump(info, f, indent=2)
    print("wrote", ADAPTER, {k: info[k] for k in ("best_step", "dev_accuracy", "test_accuracy")})


def stage_peft() -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    torch.set_num_threads(2)
    with open(os.path.join(ADAPTER, "task.json")) as f:
        info = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    model = PeftModel.from_pretrained(AutoModelForMaskedLM.from_pretrained(BASE), ADAPTER).eval()
    word_ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in info["words"]]
    assert all(len(ids) == 1 for ids in word_ids), word_ids
    assert [ids[0] for ids in word_ids] == info["label_word_ids"], (word_ids, info)
    prompts = [
        info["template"].replace("{0}", s).replace("{mask}", tokenizer.mask_token)
        for s in SENTENCES
    ]
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    mask_pos = (enc["input_ids"] == tokenizer.mask_token_id).int().argmax(-1)
    rows = torch.arange(len(prompts))

    def label_logits() -> np.ndarray:
        with torch.no_grad():
            logits = model(**enc).logits  # (B, T, V)
        return logits[rows, mask_pos][:, info["label_word_ids"]].numpy().astype(np.float32)

    peft_logits = label_logits()
    with model.disable_adapter():
        base_logits = label_logits()
    np.savez_compressed(
        os.path.join(HERE, "io.npz"),
        input_ids=enc["input_ids"].numpy(),
        attention_mask=enc["attention_mask"].numpy(),
        mask_pos=mask_pos.numpy(),
        peft_logits=peft_logits,
        base_logits=base_logits,
    )
    print("peft logits", peft_logits, "max |peft - base|", np.abs(peft_logits - base_logits).max())


if __name__ == "__main__":
    stages = {"ours": stage_ours, "peft": stage_peft}
    stage = sys.argv[1] if len(sys.argv) > 1 else ""
    if stage not in stages:
        sys.exit(f"usage: make_saved_adapter_golden.py {{{'|'.join(stages)}}}")
    stages[stage]()
