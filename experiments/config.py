"""Experiment configuration: one frozen dataclass, and named configs as small overrides of it."""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import Any

from lora_jax.errors import ConfigError
from lora_jax.losses import Loss

METHODS = ("zero_shot", "head", "lora", "full")


class KernelChoice(enum.StrEnum):
    """Which kernels ``--ntk`` predicts with (``ntk.Kernel``).

    Attributes:
      MATCHED: (``'matched'``, default) the SGD eNTK (its records as before) and, for a cell
        trained with another optimizer, that optimizer's kernel: A-SignGD for AdamW (Malladi
        et al.: Adam follows SignGD early in training); about twice the kernel time there.
      BOTH: the SGD eNTK and A-SignGD for every cell, SGD cells included.
      SGD, SIGNGD, ASIGNGD: that kernel for every cell.
    """

    MATCHED = "matched"
    BOTH = "both"
    SGD = "sgd"
    SIGNGD = "signgd"
    ASIGNGD = "asigngd"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """One experiment: a grid of task x method (x LoRA rank) x seed cells.

    Attributes:
      name: run directory name under ``out`` (``runs/<name>/``).
      model: encoder: a local Hugging Face directory, a hub id, or ``minilm`` (the embedded
        MiniLM-L6 that ships with the project's dependencies; works offline).
      models: several encoders in one run (each as ``model`` takes it): each runs the whole grid
        as a run of its own in ``runs/<name>/<encoder>/`` (``encoder_dir``: the hub id with
        ``/`` as ``--``, or a directory's name), and ``runs/<name>/report.md`` combines them.
        Empty (the default): the one ``model``. ``--model`` alone picks one encoder of a
        config that names several.
      tasks: task names (see ``lora_jax.tasks``); may be empty when ``task_files`` are given.
      task_files: JSON task files of your own data (``lora_jax.tasks.task_file``), run beside
        ``tasks`` under the names they give; stored as absolute paths.
      methods: any of ``zero_shot`` (prompt, no training), ``head`` (classification head on
        the frozen encoder), ``lora`` (prompt-based LoRA, one cell per rank), ``full``
        (prompt-based full fine-tuning).
      ranks: LoRA ranks.
      seeds: few-shot sampling seeds (LM-BFF's: 13, 21, 42, 87, 100); each also seeds training.
      k: examples per class for train, and again for dev.
      steps: training steps per cell.
      loss: ``ce`` or ``mse`` on the K outputs.
      lr: learning rate of LoRA and full fine-tuning.
      head_lr: learning rate of the head-only baseline.
      alpha: LoRA alpha; None keeps the scale alpha / r = 2 at every rank, so ranks differ only
        in capacity, not in effective step size.
      targets: LoRA target modules (regex, PEFT semantics); ``auto`` takes PEFT's default for the
        model type (``lora.default_targets``: ``query|value``, DeBERTa's ``query_proj|value_proj``).
      batch_size: training batch size.
      eval_every: evaluate on dev every this many steps (best-dev checkpoint selection).
      max_length: the most tokens an encoded example keeps (longer ones are truncated); each
        split is padded to its own longest row, rounded up to a multiple of 8 (masked padding:
        the same outputs as padding to ``max_length``, for less compute).
      test_cap: at most this many test examples (deterministic subsample); 0 = all.
      pooling: the features of the head-only baseline (``lora_jax.pooling.Pooling``): ``auto``
        (the pooling the checkpoint was trained with: mean pooling, L2-normalized, for
        sentence-transformers checkpoints such as the embedded MiniLM; BERT's pooler / RoBERTa's
        head on ``[CLS]`` otherwise), ``pooler``, ``cls`` or ``mean``.
      readout: how prompt-mode outputs are read (``lora_jax.readout.Readout``): ``auto`` (the
        MLM head when the checkpoint has one, else an ELECTRA discriminator's ``rtd``, else
        ``tied_mean``), ``mlm``, ``tied``, ``tied_mean`` or ``rtd`` (Prompting ELECTRA).
      dtype: compute dtype, ``float32`` or ``bfloat16`` (parameters, and so the trained
        adapters / weights and their optimizer state, stay float32: master weights).
      remat: recompute each encoder layer in the backward pass (less memory, same numbers).
      grad_accum: average the gradients of this many batches per optimizer update.
      train_dropout: run dropout while training: the encoder's own (its config's hidden and
        attention dropout) and ``lora_dropout`` on the LoRA branches; off at evaluation. The
        head-only baseline trains on cached features, so there only the head's dropout runs.
      lora_dropout: PEFT's ``lora_dropout`` rate on the LoRA input (with ``train_dropout``).
      ntk: for every LoRA cell, also train the linearized LoRA model (Jang et al.) and run eNTK
        kernel regression, and report accuracies, agreement, kernel and weight change.
      ntk_kernel: the kernels of ``ntk`` (``KernelChoice``): ``matched`` (the SGD eNTK and,
        for AdamW cells, Adam's A-SignGD kernel), ``both`` (SGD and A-SignGD for every cell),
        or one of ``sgd``, ``signgd``, ``asigngd`` for every cell.
      vectorize: train the LoRA cells of a task (ranks x seeds) as one vectorized job
        (``lora_jax.train.fit_job``) instead of one job per cell; same records. On a mesh (one
        process or several) the job's members are split over the devices, padded with idle
        members to a multiple of the ``data`` axis.
      members: at most this many LoRA cells per vectorized job (bounds its memory).
      pack: train and test on packed batches (``lora_jax.packing``): each batch's rows laid
        end to end, so padding costs no compute; the same results to float rounding (with
        ``train_dropout``, the same rates on other random masks). Used where the readout reads
        packed rows (MLM, TIED, TIED_MEAN; not DeBERTa) on one device.
      save_adapters: save each LoRA cell's best-dev adapter in PEFT format under
        ``adapters/<cell>/`` with the task's label words and template (``task.json``).
      tensorboard: write each cell's per-evaluation metrics as TensorBoard event files under
        ``tensorboard/<cell>/`` (needs the ``tensorboard`` extra: tensorboardX).
      out: parent directory of run directories.
    """

    name: str = "default"
    model: str = "minilm"
    models: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ("mr", "trec")
    task_files: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"flag": "--task-file", "repeatable": True}
    )
    methods: tuple[str, ...] = ("zero_shot", "head", "lora")
    ranks: tuple[int, ...] = (1, 12)
    seeds: tuple[int, ...] = (13, 21, 42)
    k: int = 16
    steps: int = 200
    loss: Loss = Loss.CE
    lr: float = 3e-4
    head_lr: float = 1e-2
    alpha: float | None = None
    targets: str = "auto"
    batch_size: int = 8
    eval_every: int = 25
    max_length: int = 48
    test_cap: int = 1000
    readout: str = "auto"
    pooling: str = "auto"
    dtype: str = "float32"
    remat: bool = False
    grad_accum: int = 1
    train_dropout: bool = False
    lora_dropout: float = 0.0
    ntk: bool = False
    ntk_kernel: KernelChoice = KernelChoice.MATCHED
    vectorize: bool = True
    members: int = 16
    pack: bool = True
    save_adapters: bool = False
    tensorboard: bool = False
    out: str = "runs"

    def __post_init__(self):
        object.__setattr__(self, "loss", Loss(self.loss))
        try:
            object.__setattr__(self, "ntk_kernel", KernelChoice(self.ntk_kernel))
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in KernelChoice)
            raise ConfigError(
                f"ntk_kernel={self.ntk_kernel!r} is not a KernelChoice; pass one of {allowed}."
            ) from None
        files = (self.task_files,) if isinstance(self.task_files, str) else self.task_files
        object.__setattr__(self, "task_files", tuple(os.path.abspath(f) for f in files))
        for name in ("models", "tasks", "methods", "ranks", "seeds"):
            value = getattr(self, name)
            if isinstance(value, str | int):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
            empty_ok = name == "models" or (name == "tasks" and self.task_files)
            if not getattr(self, name) and not empty_ok:
                raise ConfigError(f"ExperimentConfig.{name} must not be empty.")
        dirs = [encoder_dir(m) for m in self.models]
        if len(set(dirs)) < len(dirs):
            raise ConfigError(
                f"models {list(self.models)} give the same run directory twice ({dirs}); fix: "
                "name each encoder once (for two local directories, give them different names)."
            )
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"Unknown methods {unknown}; expected some of {list(METHODS)}.")
        if self.readout not in ("auto", "mlm", "tied", "tied_mean", "rtd"):
            raise ConfigError(
                f"readout={self.readout!r}; expected 'auto', 'mlm', 'tied', 'tied_mean' or 'rtd'."
            )
        if self.pooling not in ("auto", "pooler", "cls", "mean"):
            raise ConfigError(
                f"pooling={self.pooling!r}; expected 'auto', 'pooler', 'cls' or 'mean'."
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype={self.dtype!r}; expected 'float32' or 'bfloat16'.")
        if self.grad_accum < 1:
            raise ConfigError(f"grad_accum must be >= 1, got {self.grad_accum}.")
        if any(r < 1 for r in self.ranks):
            raise ConfigError(f"ranks must be >= 1, got {self.ranks}.")
        if self.members < 1:
            raise ConfigError(f"ExperimentConfig.members must be >= 1, got {self.members}.")

    def to_json(self) -> dict[str, Any]:
        """The fields that define the results (``out`` excluded: a run may be moved; nor the
        ``save_adapters`` / ``tensorboard`` outputs, which a resumed run may add, nor
        ``vectorize`` / ``members``, which give the same results)."""
        fields = dataclasses.asdict(self)
        for name in ("out", "save_adapters", "tensorboard", "vectorize", "members"):
            fields.pop(name)
        # One encoder: ``models`` is left out (config.json as before the field existed); several:
        # ``model`` is unused, and each encoder's own run directory records its ``model``.
        fields.pop("model" if self.models else "models")
        fields["loss"] = self.loss.value
        # Only --ntk runs depend on it: other runs' config.json as before the field existed.
        if self.ntk:
            fields["ntk_kernel"] = self.ntk_kernel.value
        else:
            fields.pop("ntk_kernel")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def encoder_dir(model: str) -> str:
    """The run subdirectory of one of several ``models``: a hub id with ``/`` written ``--``
    (``FacebookAI/roberta-large`` -> ``FacebookAI--roberta-large``), an existing or explicit
    path's last component (``./ckpt/my-bert/`` -> ``my-bert``), ``minilm`` as is."""
    if not model.strip():
        raise ConfigError("an empty model name; fix: give a hub id, a directory or 'minilm'.")
    looks_like_path = os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model)
    if looks_like_path:
        return os.path.basename(os.path.normpath(os.path.expanduser(model)))
    return model.replace("/", "--")


def per_encoder(cfg: ExperimentConfig) -> list[ExperimentConfig]:
    """One ordinary single-encoder config per entry of ``cfg.models``, each with its run
    directory ``out/name/<encoder_dir>``; ``[cfg]`` when ``cfg.models`` is empty."""
    if not cfg.models:
        return [cfg]
    out = os.path.join(cfg.out, cfg.name)
    return [
        dataclasses.replace(cfg, model=m, models=(), name=encoder_dir(m), out=out)
        for m in cfg.models
    ]


# The encoders of the paper's reproduction: three architectures, up to RoBERTa-large. ELECTRA is
# read with the Prompting-ELECTRA discriminator readout (``readout='auto'`` picks ``rtd``).
PAPER_ENCODERS = (
    "FacebookAI/roberta-large",
    "google-bert/bert-base-uncased",
    "google/electra-base-discriminator",
)
# LM-BFF / the paper's LoRA protocol (shared/paper.md): lr 1e-4, batch 8, 1,000 steps, best dev
# checkpoint of an evaluation every 100 steps, test capped at 1,000, seeds 13 21 42 87 100.
_PAPER_PROTOCOL: dict[str, Any] = {
    "models": PAPER_ENCODERS,
    "ranks": (1, 2, 4, 8, 12, 16),
    "seeds": (13, 21, 42, 87, 100),
    "methods": ("zero_shot", "lora"),
    "steps": 1000,
    "lr": 1e-4,
    "eval_every": 100,
    "max_length": 128,
    "test_cap": 1000,
}

NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # Offline, CPU, about 5.5 minutes on 2 cores: LoRA rank 1 vs rank 12 against zero-shot and
    # head-only baselines.
    "default": {},
    # The paper's rank sweep on the offline tasks (longer: about an hour on 2 CPU cores).
    "rank_sweep": {
        "name": "rank_sweep",
        "tasks": ("mr", "trec", "boolq"),
        "ranks": (1, 2, 4, 8, 12, 16),
        "seeds": (13, 21, 42, 87, 100),
        "methods": ("zero_shot", "lora"),
        "max_length": 128,
    },
    # Squared-error loss, the setting of the r(r+1)/2 > KN threshold.
    "rank_sweep_mse": {
        "name": "rank_sweep_mse",
        "tasks": ("mr", "trec"),
        "ranks": (1, 2, 4, 8, 12, 16),
        "seeds": (13, 21, 42, 87, 100),
        "methods": ("lora",),
        "loss": "mse",
    },
    # Real LoRA fine-tuning vs its linearization vs eNTK kernel regression (issue: NTK regime).
    "ntk_vs_finetune": {
        "name": "ntk_vs_finetune",
        "tasks": ("mr", "trec"),
        "ranks": (1, 4, 12),
        "seeds": (13, 21, 42),
        "methods": ("lora",),
        "ntk": True,
    },
    # Paper scale (needs the hub and a GPU/TPU): RoBERTa-large, GLUE-style tasks, 1000 steps.
    "paper_roberta_large": {
        "name": "paper_roberta_large",
        "model": "FacebookAI/roberta-large",
        "tasks": ("sst2", "mr", "cr", "qnli", "mnli"),
        "ranks": (1, 2, 4, 8, 12, 16),
        "seeds": (13, 21, 42, 87, 100),
        "methods": ("zero_shot", "lora", "full"),
        "steps": 1000,
        "lr": 1e-4,
        "eval_every": 100,
        "max_length": 128,
        "test_cap": 1000,
    },
    # The paper's binary claim (needs the hub and a GPU/TPU): 4 binary tasks x 3 encoders x
    # ranks 1-16 x 5 seeds; the report tests rank 1 against rank 12 per encoder and task.
    "paper_binary": {
        "name": "paper_binary",
        "tasks": ("sst2", "mr", "cr", "qnli"),
        **_PAPER_PROTOCOL,
    },
    # The paper's multi-class claim (hub, GPU/TPU): MNLI (K=3), TREC (K=6), SST-5 (K=5).
    "paper_multiclass": {
        "name": "paper_multiclass",
        "tasks": ("mnli", "trec", "sst5"),
        **_PAPER_PROTOCOL,
    },
    # CPU-sized paper_binary on the embedded MiniLM and the offline binary tasks MR, BoolQ and
    # Subj-RT: ranks 1 2 4 12 x 5 seeds, 100 steps (k = 16: 25 epochs) at batch 8 and 48 tokens
    # (BoolQ's passages are cut to fit), test capped at 1,000. 60 LoRA cells.
    "paper_binary_offline": {
        "name": "paper_binary_offline",
        "tasks": ("mr", "boolq", "subjrt"),
        "ranks": (1, 2, 4, 12),
        "seeds": (13, 21, 42, 87, 100),
        "methods": ("zero_shot", "lora"),
        "steps": 100,
    },
    # CPU-sized paper_multiclass: TREC (K = 6) x ranks 1 2 4 8 12 16 x 5 seeds, the default
    # run's 200 steps at batch 8 and 48 tokens (its seeds 13 21 42 repeat the default's TREC
    # cells). 30 LoRA cells.
    "paper_multiclass_offline": {
        "name": "paper_multiclass_offline",
        "tasks": ("trec",),
        "ranks": (1, 2, 4, 8, 12, 16),
        "seeds": (13, 21, 42, 87, 100),
        "methods": ("zero_shot", "lora"),
    },
}

# One line per named config, for ``--help``.
CONFIG_HELP: dict[str, str] = {
    "default": "offline, CPU (~5.5 min): MiniLM, MR and TREC, LoRA r=1 vs 12, baselines",
    "rank_sweep": "offline: MR, TREC, BoolQ x ranks 1-16 x 5 seeds (about an hour on 2 cores)",
    "rank_sweep_mse": "offline: the rank sweep with squared-error loss",
    "ntk_vs_finetune": "offline: LoRA vs its linearization vs eNTK kernel regression",
    "paper_roberta_large": "hub + accelerator: RoBERTa-large, 5 GLUE-style tasks, 1,000 steps",
    "paper_binary": "hub + accelerator: SST-2, MR, CR, QNLI x RoBERTa-large, BERT-base, "
    "ELECTRA-base x ranks 1-16 x 5 seeds (one run per encoder, one combined report)",
    "paper_multiclass": "hub + accelerator: MNLI, TREC, SST-5 x the same encoders, ranks, seeds",
    "paper_binary_offline": "offline, CPU-sized paper_binary: MiniLM, MR, BoolQ, Subj-RT",
    "paper_multiclass_offline": "offline, CPU-sized paper_multiclass: MiniLM, TREC (K=6)",
}


def get_config(config: str, /, **overrides: Any) -> ExperimentConfig:
    """The named config with ``overrides`` (None values are ignored) applied."""
    if config not in NAMED_CONFIGS:
        raise ConfigError(f"Unknown config {config!r}; known configs: {sorted(NAMED_CONFIGS)}.")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "model" in given and given.get("models"):
        raise ConfigError(
            "both model and models are given; fix: --model for one encoder, or --models for "
            "several."
        )
    if "model" in given and "models" not in given:
        given["models"] = ()  # --model alone: that one encoder, not the config's several
    return ExperimentConfig(**{**NAMED_CONFIGS[config], **given})
