"""PEFT golden files for DeBERTa-v3 and ELECTRA (tests/test_lora_peft_deberta_electra.py).

Regenerate, in this order, from the repository root (each stage is deterministic):

  1. /work/torchvenv/bin/python tests/golden/make_peft_golden_deberta_electra.py peft
       tiny random bases (HF dirs) + PEFT adapters saved by PEFT + inputs and PEFT's outputs:
       tests/golden/peft_deberta/, tests/golden/peft_electra/
  2. uv run python tests/golden/make_peft_golden_deberta_electra.py ours
       an adapter made by lora_jax (fixed seed) on each base, exported with lora.save_peft:
       tests/golden/peft_<model>/ours/
  3. /work/torchvenv/bin/python tests/golden/make_peft_golden_deberta_electra.py peft-load-ours
       PEFT loads those directories onto the bases and records its outputs (ours_logits).

Versions used: torch 2.13.0+cpu, transformers 5.24.0, peft 0.21.2.

Cases:
  peft_deberta: DebertaV2ForSequenceClassification (3 labels), v3-like (share_att_key, so the
    LoRA on query_proj / key_proj also moves the position queries / keys; p2c|c2p, 8 buckets,
    layer-normed relative embeddings), task_type SEQ_CLS, target_modules
    ["query_proj", "value_proj"], r=4, lora_alpha=8, modules_to_save=["classifier"].
    Ours: targets "query_proj|value_proj", r=2, alpha=4, modules_to_save=("classifier",).
  peft_electra: ElectraForMaskedLM (generator, embedding_size 16 -> hidden 32),
    target_modules ["query", "value"], r=4, lora_alpha=8, bias="lora_only".
    Ours: targets "query|value", r=3, alpha=3, layers=(1,).
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 4321
VOCAB, SEQ, BATCH = 96, 12, 3
CASES = {
    "peft_deberta": dict(
        peft=dict(
            task_type="SEQ_CLS",
            target_modules=["query_proj", "value_proj"],
            r=4,
            lora_alpha=8,
            modules_to_save=["classifier"],
        ),
        ours=dict(targets="query_proj|value_proj", r=2, alpha=4.0, modules_to_save=("classifier",)),
        head="cls",
        task_type="SEQ_CLS",
    ),
    "peft_electra": dict(
        peft=dict(target_modules=["query", "value"], r=4, lora_alpha=8, bias="lora_only"),
        ours=dict(targets="query|value", r=3, alpha=3.0, layers=(1,)),
        head="mlm",
        task_type=None,
    ),
}


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    ids = rng.integers(3, VOCAB, size=(BATCH, SEQ)).astype(np.int64)
    mask = np.ones((BATCH, SEQ), np.int64)
    ids[:, 0] = 1  # [CLS]
    mask[1, 8:] = 0  # one padded row
    ids[1, 8:] = 0  # [PAD]
    return {"input_ids": ids, "attention_mask": mask}


def _torch_base(name: str):
    import torch
    import transformers as T

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    if name == "peft_deberta":
        config = T.DebertaV2Config(
            **common,
            relative_attention=True,
            share_att_key=True,
            pos_att_type="p2c|c2p",
            position_buckets=8,
            norm_rel_ebd="layer_norm",
            position_biased_input=False,
            type_vocab_size=0,
            num_labels=3,
        )
        model_cls = T.DebertaV2ForSequenceClassification
    else:
        config = T.ElectraConfig(**common, embedding_size=16)
        model_cls = T.ElectraForMaskedLM
    torch.manual_seed(SEED)
    model = model_cls(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases so every leaf matters
        for n, p in model.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _out(model, batch) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()


def stage_peft() -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(2)
    batch = inputs()
    for i, (name, case) in enumerate(CASES.items()):
        out_dir = os.path.join(HERE, name)
        base = _torch_base(name)
        base.save_pretrained(os.path.join(out_dir, "base"))
        base_out = _out(base, batch)
        model = get_peft_model(base, LoraConfig(**case["peft"]))
        g = torch.Generator().manual_seed(SEED + i)
        with torch.no_grad():  # B = 0 at init: perturb every trained tensor
            for _, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
        model.save_pretrained(os.path.join(out_dir, "adapter"))
        os.remove(os.path.join(out_dir, "adapter", "README.md"))  # PEFT's model card
        peft_out = _out(model, batch)
        np.savez_compressed(
            os.path.join(out_dir, "io.npz"), **batch, base_logits=base_out, peft_logits=peft_out
        )
        print(name, "max |peft - base|:", np.abs(peft_out - base_out).max())


def our_adapters(name: str, params):
    """The lora_jax adapter of stage 'ours' (also rebuilt by the test)."""
    import jax

    from lora_jax import lora

    cfg = lora.LoraConfig(**CASES[name]["ours"])
    k_init, k_b = jax.random.split(jax.random.key(SEED))
    leaves, treedef = jax.tree.flatten(lora.init(k_init, params, cfg))
    keys = jax.random.split(k_b, len(leaves))
    leaves = [
        x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves), cfg


def stage_ours() -> None:
    from lora_jax import lora
    from lora_jax.models import from_pretrained, split

    for name, case in CASES.items():
        base = os.path.join(HERE, name, "base")
        _, params = split(from_pretrained(base, head=case["head"]))
        adapters, cfg = our_adapters(name, params)
        out = os.path.join(HERE, name, "ours")
        lora.save_peft(out, adapters, cfg, task_type=case["task_type"])
        print("wrote", out)


def stage_peft_load_ours() -> None:
    import torch
    import transformers as T
    from peft import PeftModel

    torch.set_num_threads(2)
    batch = inputs()
    classes = {
        "peft_deberta": T.DebertaV2ForSequenceClassification,
        "peft_electra": T.ElectraForMaskedLM,
    }
    for name in CASES:
        d = os.path.join(HERE, name)
        base = classes[name].from_pretrained(os.path.join(d, "base")).eval()
        model = PeftModel.from_pretrained(base, os.path.join(d, "ours")).eval()
        io = dict(np.load(os.path.join(d, "io.npz")))
        io["ours_logits"] = _out(model, batch)
        np.savez_compressed(os.path.join(d, "io.npz"), **io)
        print(name, "ours_logits max |.|", np.abs(io["ours_logits"]).max())


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":  # PEFT writes target_modules from a set
        os.execve(
            sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"}
        )
    stage = sys.argv[1] if len(sys.argv) > 1 else ""
    stages = {"peft": stage_peft, "ours": stage_ours, "peft-load-ours": stage_peft_load_ours}
    if stage not in stages:
        sys.exit(f"usage: make_peft_golden_deberta_electra.py {{{'|'.join(stages)}}}")
    stages[stage]()
