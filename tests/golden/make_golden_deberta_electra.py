"""Regenerates the DeBERTa-v2/v3 and ELECTRA golden files of tests/test_models_golden_v3.py.

Needs torch + transformers 5 (not project dependencies), e.g. the scratch venv of make_golden.py:

    /work/torchvenv/bin/python tests/golden/make_golden_deberta_electra.py

It writes, under tests/golden/ (tiny random configs, all heads, padding in every batch):
  * ``<name>/`` HF checkpoints saved by transformers and ``<name>.npz`` with the inputs and the
    torch outputs in float32 (``out``) and float64 (``out64``):
      deberta_mlm   DebertaV2ForMaskedLM (legacy cls.predictions head), v3-like: share_att_key,
                    pos_att_type p2c|c2p, position_buckets 8, norm_rel_ebd layer_norm, no
                    absolute positions, no token types
      deberta_lmp   DebertaV2ForMaskedLM with legacy=false (lm_predictions.lm_head, the layout
                    of Microsoft's v1/v2 weights): separate pos_query_proj, pos_att_type p2c,
                    position_buckets 16, max_relative_positions 32
      deberta_cls   DebertaV2ForSequenceClassification (ContextPooler, 3 labels): separate
                    pos_key_proj, pos_att_type c2p, no buckets, max_relative_positions 6
                    (distances clipped), absolute positions, 2 token types, embedding_size 24
                    (embed_proj)
      deberta_base  DebertaV2Model, as deberta_mlm but position_buckets 4
      deberta_bin   the deberta_mlm weights as a torch ``pytorch_model.bin`` (no npz)
      electra_mlm   ElectraForMaskedLM (generator), embedding_size 16 (embeddings_project)
      electra_rtd   ElectraForPreTraining (discriminator), embedding_size = hidden_size
      electra_cls   ElectraForSequenceClassification (3 labels), embedding_size 16
  * ``deberta_buckets.npz``: transformers' ``build_relative_position`` for DeBERTa-v3-base's
    (position_buckets 256, max_relative_positions 512) on 1024 tokens (its first column and row);
  * ``electra_prompt.npz``: Prompting ELECTRA with electra_rtd: each of 3 label words put at a
    "mask" position in turn, minus the discriminator logit there (``scores``, [B, K]);
  * ``roundtrip_v3.json``: transformers loads what ``lora_jax.models.save_pretrained`` writes
    for each of them with no missing / unexpected keys and the same outputs (lora_jax runs via
    ``uv run`` in a subprocess).
Versions used: torch 2.13.0+cpu, transformers 5.24.0.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers as T
from transformers.models.deberta_v2 import modeling_deberta_v2 as D

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_golden import REPO, batch, run  # noqa: E402

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    pad_token_id=0,
)
V3 = dict(
    relative_attention=True,
    share_att_key=True,
    pos_att_type="p2c|c2p",
    position_buckets=8,
    norm_rel_ebd="layer_norm",
    position_biased_input=False,
    type_vocab_size=0,
    max_relative_positions=-1,
    layer_norm_eps=1e-7,
)
MODELS = {
    # name: (config class, model class, config overrides)
    "deberta_mlm": (T.DebertaV2Config, T.DebertaV2ForMaskedLM, V3),
    "deberta_lmp": (
        T.DebertaV2Config,
        T.DebertaV2ForMaskedLM,
        dict(
            relative_attention=True,
            share_att_key=False,
            pos_att_type="p2c",
            position_buckets=16,
            max_relative_positions=32,
            position_biased_input=False,
            type_vocab_size=0,
            legacy=False,
        ),
    ),
    "deberta_cls": (
        T.DebertaV2Config,
        T.DebertaV2ForSequenceClassification,
        dict(
            relative_attention=True,
            share_att_key=False,
            pos_att_type="c2p",
            max_relative_positions=6,
            position_biased_input=True,
            type_vocab_size=2,
            embedding_size=24,
            num_labels=3,
        ),
    ),
    "deberta_base": (T.DebertaV2Config, T.DebertaV2Model, V3 | dict(position_buckets=4)),
    "electra_mlm": (T.ElectraConfig, T.ElectraForMaskedLM, dict(embedding_size=16)),
    "electra_rtd": (T.ElectraConfig, T.ElectraForPreTraining, dict(embedding_size=32)),
    "electra_cls": (
        T.ElectraConfig,
        T.ElectraForSequenceClassification,
        dict(embedding_size=16, num_labels=3),
    ),
}
HEAD = {"mlm": "mlm", "lmp": "mlm", "cls": "cls", "rtd": "rtd", "base": None}


def make_tiny(name: str, seed: int) -> None:
    config_cls, model_cls, overrides = MODELS[name]
    config = config_cls(**(COMMON | overrides))
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # move every weight (LayerNorms, biases too) off its init value
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    inputs = batch(config, seed)
    if config.type_vocab_size <= 1:
        inputs["token_type_ids"][:] = 0
    outdir = HERE / name
    shutil.rmtree(outdir, ignore_errors=True)
    model.save_pretrained(outdir)
    out32 = run(model, inputs, torch.float32).astype(np.float32)
    out64 = run(model, inputs, torch.float64)
    np.savez_compressed(HERE / f"{name}.npz", out=out32, out64=out64, **inputs)
    if name == "deberta_mlm":  # the same weights as a torch pytorch_model.bin
        bindir = HERE / "deberta_bin"
        shutil.rmtree(bindir, ignore_errors=True)
        bindir.mkdir()
        model.to(torch.float32).config.save_pretrained(bindir)
        torch.save(model.state_dict(), bindir / "pytorch_model.bin")
    print(f"{name}: out {out32.shape}, |out|max {np.abs(out32).max():.3f}")


def make_buckets() -> None:
    """v3-base bucketing on 1024 tokens: rel[i, 0] = d(i) and rel[0, j] = d(-j)."""
    x = torch.zeros(1, 1024, 1)
    rel = D.build_relative_position(x, x, bucket_size=256, max_position=512)[0].numpy()
    np.savez_compressed(
        HERE / "deberta_buckets.npz",
        first_col=rel[:, 0].astype(np.int16),
        first_row=rel[0, :].astype(np.int16),
    )
    assert all(np.array_equal(rel[i, i:], rel[0, : 1024 - i]) for i in (1, 100, 700))  # Toeplitz


def make_prompt() -> None:
    """Scores of label words at a mask position: -ElectraForPreTraining logit there."""
    model = T.ElectraForPreTraining.from_pretrained(HERE / "electra_rtd").eval()
    z = np.load(HERE / "electra_rtd.npz")
    pos, words = np.array([5, 2, 2]), np.array([7, 40, 99])
    scores = np.zeros((3, 3), np.float32)
    for k, w in enumerate(words):
        ids = z["input_ids"].copy()
        ids[np.arange(3), pos] = w
        inputs = {"input_ids": ids, "attention_mask": z["attention_mask"]}
        inputs["token_type_ids"] = z["token_type_ids"]
        scores[:, k] = -run(model, inputs, torch.float32)[np.arange(3), pos]
    np.savez_compressed(HERE / "electra_prompt.npz", mask_pos=pos, words=words, scores=scores)


_OURS = """
import sys, numpy as np, jax
from lora_jax import models as M
src, dst, heads, names = sys.argv[1], sys.argv[2], eval(sys.argv[3]), sys.argv[4:]
for name in names:
    model = M.from_pretrained(f'{src}/{name}', head=heads[name.split('_')[-1]])
    M.save_pretrained(model, f'{dst}/{name}')
    z = np.load(f'{src}/{name}.npz')
    out = model(z['input_ids'], z['attention_mask'], z['token_type_ids'])
    np.save(f'{dst}/{name}.ours.npy', np.asarray(out))
"""


def check_roundtrip() -> None:
    """transformers must read what lora_jax.models.save_pretrained writes."""
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["uv", "run", "python", "-c", _OURS, str(HERE), tmp, repr(HEAD), *MODELS],
            cwd=REPO,
            check=True,
        )
        for name, (_, model_cls, _) in MODELS.items():
            z = np.load(HERE / f"{name}.npz")
            inputs = {k: z[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            model, info = model_cls.from_pretrained(f"{tmp}/{name}", output_loading_info=True)
            problems = {k: v for k, v in info.items() if v}
            theirs = run(model, inputs, torch.float32)
            ours = np.load(f"{tmp}/{name}.ours.npy")
            report[name] = {
                "architectures": json.loads(Path(f"{tmp}/{name}/config.json").read_text())[
                    "architectures"
                ],
                "loading_problems": {k: sorted(map(str, v)) for k, v in problems.items()},
                "max_abs_diff_transformers_vs_lora_jax": float(np.abs(theirs - ours).max()),
                "max_abs_diff_vs_golden": float(np.abs(theirs - z["out"]).max()),
            }
            entry = report[name]
            ok = (
                not problems
                and max(
                    entry["max_abs_diff_transformers_vs_lora_jax"], entry["max_abs_diff_vs_golden"]
                )
                < 1e-4
            )
            print(f"roundtrip {name}: {'ok' if ok else 'FAILED'} {entry}")
            assert ok, entry
    (HERE / "roundtrip_v3.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def main() -> None:
    torch.set_num_threads(2)
    for seed, name in enumerate(MODELS):
        make_tiny(name, 100 + seed)
    make_buckets()
    make_prompt()
    if "--skip-roundtrip" not in sys.argv:
        check_roundtrip()


if __name__ == "__main__":
    main()
