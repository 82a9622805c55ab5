"""Both LoRA rank conditions for real models and tasks: ``python -m experiments.thresholds``.

Prints, for each model and each number of classes K (k-shot: N = k K training examples, so
KN numbers are fit), the smallest rank under the old rule ``r (r + 1) / 2 > KN`` and under the
manifold rule ``r (m + n) - r^2 > C* KN`` (summed over every adapted matrix, and for the
smallest single matrix), then a per-rank table of how many of the KN constraints each count
covers. Shapes are read from the params: the real checkpoint for ``minilm`` or a local
directory, abstract params (``jax.ShapeDtypeStruct``, no weights) built by the model code for
the presets ``roberta-large``, ``roberta-base`` and ``bert-base``.

Defaults: RoBERTa-large (m = n = 1024, query and value in 24 layers) and the embedded MiniLM
(m = n = 384, 6 layers), 16-shot, K = 2, 3 and 6.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from lora_jax import lora, models
from lora_jax import params as params_lib
from lora_jax.models.encoder import param_shapes
from ntk.theory import thresholds as th

#: Offline shape presets (the Hugging Face configs of these checkpoints).
PRESETS = {
    "roberta-large": models.EncoderConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    "roberta-base": models.EncoderConfig(),
    "bert-base": models.EncoderConfig(model_type="bert", vocab_size=30522, pad_token_id=0),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ThresholdsConfig:
    """What to compute.

    Attributes:
      models: presets (``roberta-large``, ``roberta-base``, ``bert-base``), ``minilm`` or local
        Hugging Face directories.
      targets: LoRA target modules (regex, PEFT semantics).
      k: examples per class (N = k K).
      num_labels: the K values to tabulate.
      kn: if given, use this KN instead of k K^2 (then ``num_labels`` is ignored).
      c_star: the constant of the manifold rule.
      ranks: ranks shown in the per-rank table.
    """

    models: tuple[str, ...] = ("roberta-large", "minilm")
    targets: str = "query|value"
    k: int = 16
    num_labels: tuple[int, ...] = (2, 3, 6)
    kn: int | None = None
    c_star: float = th.PAPER_C_STAR
    ranks: tuple[int, ...] = (1, 2, 4, 8, 12, 16)

    def __post_init__(self):
        if self.k < 1 or any(n < 2 for n in self.num_labels) or (self.kn or 1) < 1:
            raise ValueError(
                f"need k >= 1, every num_labels >= 2 and kn >= 1; got k={self.k}, "
                f"num_labels={self.num_labels}, kn={self.kn}."
            )
        if self.c_star <= 0:
            raise ValueError(f"c_star must be > 0, got {self.c_star}.")

    def kns(self) -> list[tuple[int | None, int]]:
        """``[(K, KN)]``; K is None when ``kn`` is given directly."""
        if self.kn is not None:
            return [(None, self.kn)]
        return [(n, n * self.k * n) for n in self.num_labels]


def model_params(name: str) -> dict:
    """Params of ``name``: abstract (shapes only) for presets, the real weights otherwise."""
    if name in PRESETS:
        shapes = param_shapes(PRESETS[name], head=None, num_labels=None, pooler=False)
        flat = {p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in shapes.items()}
        return params_lib.unflatten(flat)
    path = models.minilm_path() if name == "minilm" else name
    if not os.path.isdir(path):
        raise ValueError(
            f"model {name!r} is neither a preset ({sorted(PRESETS)}), 'minilm', nor a local "
            "directory with config.json; pass one of those."
        )
    _, params = models.split(models.from_pretrained(path, head=None))
    return params


def summary(cfg: ThresholdsConfig) -> list[dict]:
    """One record per (model, K): shapes, KN, smallest rank under each rule, coverage."""
    lcfg = lora.LoraConfig(r=1, alpha=2.0, targets=cfg.targets)
    records = []
    for name in cfg.models:
        params = model_params(name)
        targets = th.adapted_shapes(params, lcfg)
        shapes = sorted({(t.in_features, t.out_features) for t in targets})
        for k_classes, kn in cfg.kns():
            table = th.rank_table(params, lcfg, kn, cfg.ranks, cfg.c_star)
            records.append(
                {
                    "model": name,
                    "matrices": len(targets),
                    "shapes": [list(s) for s in shapes],
                    "K": k_classes,
                    "KN": kn,
                    "old_rank": th.smallest_rank_old(kn),
                    "old_rank_sqrt": th.smallest_rank_old(kn, exact=False),
                    "new_rank_summed": th.smallest_rank_new(params, lcfg, kn, cfg.c_star),
                    "new_rank_per_matrix": th.smallest_rank_new(
                        params, lcfg, kn, cfg.c_star, summed=False
                    ),
                    "table": [row._asdict() for row in table],
                }
            )
    return records


def markdown(records: list[dict], c_star: float) -> str:
    """The summary table and one per-rank coverage table per record."""
    lines = [
        f"| model | adapted matrices (m x n) | K | KN | old rule r(r+1)/2 > KN | "
        f"old, leading order r > sqrt(2KN) | new rule, summed: dim > {c_star} KN "
        "| new rule, one matrix |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        shapes = ", ".join(f"{m}x{n}" for m, n in rec["shapes"])
        lines.append(
            f"| {rec['model']} | {rec['matrices']} of {shapes} | {rec['K'] or '-'} | {rec['KN']} "
            f"| r >= {rec['old_rank']} | r >= {rec['old_rank_sqrt']} "
            f"| r >= {rec['new_rank_summed']} "
            f"| r >= {rec['new_rank_per_matrix']} |"
        )
    for rec in records:
        lines += [
            "",
            f"{rec['model']}, KN = {rec['KN']}: constraints covered (of KN) by each count",
            "",
            "| r | r(r+1)/2 | old: covered | dim, one matrix | new: covered | dim, summed "
            "| new summed: covered |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in rec["table"]:
            lines.append(
                f"| {row['r']} | {row['sard']} | {row['old_covered']} | {row['dim_min']} | "
                f"{row['new_covered_per_matrix']} | {row['dim_sum']} | "
                f"{row['new_covered_summed']} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[ThresholdsConfig, bool]:
    """Maps the command line one-to-one onto :class:`ThresholdsConfig` fields."""
    parser = argparse.ArgumentParser(prog="python -m experiments.thresholds", description=__doc__)
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--targets")
    parser.add_argument("--k", type=int)
    parser.add_argument("--num-labels", nargs="+", type=int)
    parser.add_argument("--kn", type=int)
    parser.add_argument("--c-star", type=float)
    parser.add_argument("--ranks", nargs="+", type=int)
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = vars(parser.parse_args(argv))
    as_json = args.pop("json")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if v is not None}
    try:
        cfg = ThresholdsConfig(**fields)
    except ValueError as err:
        parser.error(str(err))
    return cfg, as_json


def main(argv: list[str] | None = None) -> None:
    cfg, as_json = parse_args(argv)
    try:
        records = summary(cfg)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    print(json.dumps(records, indent=1) if as_json else markdown(records, cfg.c_star))


if __name__ == "__main__":
    main()
