"""Golden files for PEFT LoRA interop (tests/test_lora_peft.py).

Regenerate, in this order, from the repository root (each stage is deterministic):

  1. /work/torchenv/bin/python tests/golden/make_peft_golden.py peft
       tiny random RoBERTa bases (HF dirs) + PEFT adapters saved by PEFT itself + inputs and
       PEFT's outputs:  tests/golden/peft_mlm/, tests/golden/peft_cls/
  2. uv run python tests/golden/make_peft_golden.py ours
       an adapter made by lora_jax (fixed seed) on the peft_cls base, exported with
       lora_jax.lora.save_peft:  tests/golden/peft_ours/adapter/
  3. /work/torchenv/bin/python tests/golden/make_peft_golden.py peft-load-ours
       PEFT loads that directory onto the peft_cls base and records its outputs:
       tests/golden/peft_ours/io.npz

Stages 1 and 3 need torch + transformers + peft (the scratch venv, never the project's); stage 2
needs only lora_jax. Everything is float32 and CPU; all files together stay well under 1 MB.
Reruns give identical files (seeded; the script re-executes itself with PYTHONHASHSEED=0 because
PEFT writes target_modules from a set). Versions used: torch 2.13.0+cpu, transformers 5.23.0,
peft 0.21.2.

Cases:
  peft_mlm: RobertaForMaskedLM, target_modules=["query", "value"], r=4, lora_alpha=8,
    bias="all" (every bias is saved by PEFT and perturbed here), all LoRA weights perturbed.
  peft_cls: RobertaForSequenceClassification (3 labels), task_type SEQ_CLS,
    target_modules=["query", "value", "intermediate.dense"], r=4, lora_alpha=8,
    rank_pattern={"value": 2}, alpha_pattern={"layer.1.attention.self.query": 32},
    use_rslora=True, bias="lora_only", modules_to_save=["classifier"].
  peft_ours: lora_jax LoraConfig(targets="query|value", layers=(1,), r=3, alpha=6,
    rank_pattern={"query": 2}, bias="lora_only", modules_to_save=("classifier",)) on the peft_cls
    base, B and classifier perturbed with a fixed seed.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 1234
VOCAB, HIDDEN, LAYERS, HEADS, INTER, SEQ, BATCH = 96, 32, 2, 4, 48, 12, 3

OURS_CONFIG = dict(
    targets="query|value",
    layers=(1,),
    r=3,
    alpha=6.0,
    rank_pattern={"query": 2},
    bias="lora_only",
    modules_to_save=("classifier",),
)


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    ids = rng.integers(3, VOCAB, size=(BATCH, SEQ)).astype(np.int64)
    mask = np.ones((BATCH, SEQ), np.int64)
    ids[:, 0] = 0  # <s>
    mask[1, 8:] = 0  # one padded row
    ids[1, 8:] = 1  # <pad>
    ids[2, SEQ // 2] = 4  # a "<mask>"-like token id in the middle (any id works here)
    return {"input_ids": ids, "attention_mask": mask}


def _torch_base(head: str):
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification

    config = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTER,
        max_position_embeddings=SEQ + 4,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=3,
    )
    torch.manual_seed(SEED if head == "mlm" else SEED + 1)
    cls = RobertaForMaskedLM if head == "mlm" else RobertaForSequenceClassification
    model = cls(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases so every leaf matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _perturb(model, predicate, seed: int, std: float = 0.2) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if predicate(name):
                p.add_(std * torch.randn(p.shape, generator=g))


def _out(model, inputs) -> np.ndarray:
    import torch

    with torch.no_grad():
        t = {k: torch.from_numpy(v) for k, v in inputs.items()}
        return model(**t).logits.numpy().astype(np.float32)


def stage_peft() -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(2)
    inputs = _inputs()
    cases = {
        "peft_mlm": (
            "mlm",
            dict(target_modules=["query", "value"], r=4, lora_alpha=8, bias="all"),
        ),
        "peft_cls": (
            "cls",
            dict(
                task_type="SEQ_CLS",
                target_modules=["query", "value", "intermediate.dense"],
                r=4,
                lora_alpha=8,
                rank_pattern={"value": 2},
                alpha_pattern={"layer.1.attention.self.query": 32},
                use_rslora=True,
                bias="lora_only",
                modules_to_save=["classifier"],
            ),
        ),
    }
    for i, (name, (head, kw)) in enumerate(cases.items()):
        out_dir = os.path.join(HERE, name)
        base = _torch_base(head)
        base.save_pretrained(os.path.join(out_dir, "base"))
        base_out = _out(base, inputs)
        model = get_peft_model(base, LoraConfig(**kw))
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        _perturb(model, lambda n, tr=tuple(trained): n in tr, SEED + 10 + i)
        model.save_pretrained(os.path.join(out_dir, "adapter"))
        os.remove(os.path.join(out_dir, "adapter", "README.md"))  # PEFT's generated model card
        peft_out = _out(model, inputs)
        merged = model.merge_and_unload()
        merged_out = _out(merged, inputs)
        kernels = {
            f"merged/{n}": p.detach().numpy().T.copy()
            for n, p in merged.named_parameters()
            if n.endswith(".weight") and p.ndim == 2 and "embeddings" not in n
        }
        np.savez_compressed(
            os.path.join(out_dir, "io.npz"),
            **inputs,
            base_logits=base_out,
            peft_logits=peft_out,
            merged_logits=merged_out,
            **kernels,
        )
        print(
            name,
            "trainable:",
            len(trained),
            "max |peft - base|:",
            np.abs(peft_out - base_out).max(),
        )


def stage_ours() -> None:
    import jax

    from lora_jax import lora
    from lora_jax.models import from_pretrained, split

    _, params = split(from_pretrained(os.path.join(HERE, "peft_cls", "base"), head="cls"))
    cfg = lora.LoraConfig(**OURS_CONFIG)
    k_init, k_b = jax.random.split(jax.random.key(SEED))
    adapters = lora.init(k_init, params, cfg)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(k_b, len(leaves))
    leaves = [
        x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    adapters = jax.tree.unflatten(treedef, leaves)
    lora.save_peft(
        os.path.join(HERE, "peft_ours", "adapter"),
        adapters,
        cfg,
        task_type="SEQ_CLS",
        base_model_name_or_path="tests/golden/peft_cls/base",
    )
    print("wrote", os.path.join(HERE, "peft_ours", "adapter"))


def stage_peft_load_ours() -> None:
    import torch
    from peft import PeftModel

    torch.set_num_threads(2)
    inputs = _inputs()
    from transformers import RobertaForSequenceClassification

    base = RobertaForSequenceClassification.from_pretrained(os.path.join(HERE, "peft_cls", "base"))
    base.eval()
    model = PeftModel.from_pretrained(base, os.path.join(HERE, "peft_ours", "adapter")).eval()
    out = _out(model, inputs)
    with open(os.path.join(HERE, "peft_ours", "adapter", "adapter_config.json")) as f:
        print("loaded config:", json.load(f)["target_modules"])
    np.savez_compressed(os.path.join(HERE, "peft_ours", "io.npz"), **inputs, peft_logits=out)
    print("peft_ours logits", out)


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":  # PEFT writes target_modules from a set
        os.execve(
            sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"}
        )
    stage = sys.argv[1] if len(sys.argv) > 1 else ""
    stages = {"peft": stage_peft, "ours": stage_ours, "peft-load-ours": stage_peft_load_ours}
    if stage not in stages:
        sys.exit(f"usage: make_peft_golden.py {{{'|'.join(stages)}}}")
    stages[stage]()
