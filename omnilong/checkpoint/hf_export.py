"""Export a training checkpoint (a DCP ``step_N`` directory) to a Hugging Face model directory.

The output mirrors the base model it was trained from: the same tensor names (the base's
own layout), shapes and, by default, dtypes; every non-weight file of the base; and a
``config.json`` with the fields the run changed (``rope_theta``, the dtype) plus
``omnilong_mrope_positions``, which says the rule the checkpoint was trained with for
multimodal RoPE positions (the one Qwen2.5-VL was released and is served with: text after
an image or video resumes at its largest position + 1, as transformers 4.49-4.57 and vLLM
compute them, not transformers >= 5.3). transformers keeps such an extra field as a config
attribute (``model.config.omnilong_mrope_positions``) and ignores it otherwise. Tensors the
run saved come from the checkpoint; any it did not hold are copied from the base.

The checkpoint is read one output shard at a time: DCP's metadata says which tensors it
holds, and ``dcp.load`` fills preallocated CPU tensors for only the keys of the shard being
written, so the whole model is never in memory at once. Nothing is unpickled beyond DCP's
own metadata classes, and weights are written as safetensors only.
"""

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from omnilong.checkpoint.dcp_io import load_model_tensors, model_tensor_metadata, read_checkpoint_metadata
from omnilong.checkpoint.hf_check import check_hf_weights, shape_problem
from omnilong.hf_io import INDEX_NAME, hf_weight_files, read_hf_config
from omnilong.models.families import ModelFamily, model_family

logger = logging.getLogger(__name__)

RUN_CONFIG_NAME = "config.yaml"
#: config.json field naming the M-RoPE position rule a Qwen2.5-VL checkpoint was trained with
#: (each family's extra fields: :attr:`ModelFamily.export_config_fields`).
POSITION_RULE_KEY = "omnilong_mrope_positions"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"5GB"`` (10^9) or ``"500MiB"`` (2^20).

    Raises:
        ValueError: not a positive size (names it).
    """
    if isinstance(size, int):
        n = size
    else:
        match = _SIZE.match(size)
        if match is None:
            raise ValueError(f"bad shard size {size!r}: expected bytes or a number with a unit, e.g. 5GB or 500MB")
        n = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if n <= 0:
        raise ValueError(f"bad shard size {size!r}: must be positive")
    return n


def _run_rope_theta(checkpoint: Path, base: Path) -> float | None:
    """The run's ``rope_theta`` override (None: it kept the base's), from the checkpoint's
    ``config.yaml``; warns when the run was trained from another base directory.

    Raises:
        FileNotFoundError: the checkpoint has no ``config.yaml``.
    """
    path = checkpoint / RUN_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a training checkpoint holds the run's config.yaml")
    run = OmegaConf.load(path)
    trained_from = run.get("checkpoint_dir")
    if trained_from is not None and Path(str(trained_from)).resolve() != base.resolve():
        logger.warning("%s was trained from %s, exporting against base %s", checkpoint, trained_from, base)
    rope_theta = run.get("rope_theta")
    return None if rope_theta is None else float(rope_theta)


# ---------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class _Entry:
    """One tensor of the export: its name (the base's), shape, output dtype, and source:
    the checkpoint (``native_key``) or the base file ``base_file``."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    base_file: Path
    native_key: str | None

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def _base_tensors(base: Path) -> dict[str, tuple[Path, tuple[int, ...], torch.dtype]]:
    """Key -> (file, shape, dtype) of every tensor of the base, in its files' order, read from
    the safetensors headers only.

    Raises:
        FileNotFoundError: the base has no safetensors weights.
        ValueError: a base file is unreadable (names it).
    """
    out = {}
    for path in hf_weight_files(base):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    info = f.get_slice(key)
                    out[key] = (path, tuple(info.get_shape()), info.get_dtype())
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read safetensors file {path} (truncated or corrupt?): {e}") from e
    unknown = sorted({f"{key}: {dtype}" for key, (_, _, dtype) in out.items() if dtype not in _SAFETENSORS_DTYPES})
    if unknown:
        raise ValueError(f"{base} has tensors of dtypes this export does not handle: {unknown[:5]}")
    return {key: (path, shape, _SAFETENSORS_DTYPES[dtype]) for key, (path, shape, dtype) in out.items()}


def _hub_name(family: ModelFamily, native_key: str) -> str:
    """The HF hub name of a native key (``KeyError`` naming it when it has none)."""
    return next(iter(family.native_to_hf({native_key: torch.empty(0)})))


def _plan(
    base_tensors: dict[str, tuple[Path, tuple[int, ...], torch.dtype]],
    trained: dict[str, TensorStorageMetadata],
    dtype: torch.dtype | None,
    family: ModelFamily,
    tied: bool,
) -> list[_Entry]:
    """Every tensor of the base, with the checkpoint as source where the run trained it.

    With ``tied`` embeddings the base stores no output projection (``lm_head.weight``), and
    the checkpoint's ``output.weight`` (the embedding itself) is left out.

    Raises:
        ValueError: a checkpoint tensor has no place in the base or another shape (names them).
    """
    base_name = {family.to_hub_layout(key): key for key in base_tensors}
    source: dict[str, str] = {}  # base key -> native key
    errors = []
    for native_key, md in trained.items():
        try:
            hub_key = _hub_name(family, native_key)
        except KeyError as e:
            errors.append(str(e.args[0]))
            continue
        if hub_key not in base_name:
            if not (tied and native_key == "output.weight"):
                errors.append(f"checkpoint tensor {native_key!r} ({hub_key}) has no place in the base")
            continue
        key = base_name[hub_key]
        if tuple(md.size) != base_tensors[key][1]:
            errors.append(f"{native_key}: checkpoint {tuple(md.size)} vs base {key} {base_tensors[key][1]}")
        source[key] = native_key
    if errors:
        raise ValueError("checkpoint does not match the base model: " + "; ".join(errors))
    return [
        _Entry(
            key,
            shape,
            dtype if dtype is not None and base_dtype.is_floating_point else base_dtype,
            path,
            source.get(key),
        )
        for key, (path, shape, base_dtype) in base_tensors.items()
    ]


def _shards(entries: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _check_shapes(
    checkpoint: Path,
    trained: dict[str, TensorStorageMetadata],
    base: Path,
    base_config: dict[str, Any],
    family: ModelFamily,
) -> None:
    """Every tensor of the base's weights and of the checkpoint has the shape the base's
    config.json gives it.

    Raises:
        ValueError: naming the tensor, both shapes and the config key.
    """
    check_hf_weights(base, base_config)
    expected = family.hf_tensor_shapes(base_config)
    problems = []
    for native_key, md in trained.items():
        hub_key = _map_or_none(family, native_key)
        if hub_key in expected:
            problem = shape_problem(hub_key, tuple(md.size), expected[hub_key], f"the checkpoint ({native_key})")
            if problem is not None:
                problems.append(problem)
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ValueError(
            f"{checkpoint} does not match the base's {base / 'config.json'}: {'; '.join(problems[:3])}{more}"
        )


def _map_or_none(family: ModelFamily, native_key: str) -> str | None:
    try:
        return _hub_name(family, native_key)
    except KeyError:
        return None  # reported by _plan


# ---------------------------------------------------------------------------- writing
def _shard_tensors(
    checkpoint: Path, trained: dict[str, TensorStorageMetadata], shard: list[_Entry]
) -> dict[str, torch.Tensor]:
    """The tensors of one output shard, in their output dtypes (base key -> tensor)."""
    wanted = {e.native_key: trained[e.native_key] for e in shard if e.native_key is not None}
    from_checkpoint = load_model_tensors(checkpoint, wanted)
    out = {}
    for base_file in dict.fromkeys(e.base_file for e in shard if e.native_key is None):
        with safe_open(base_file, framework="pt") as f:
            for e in shard:
                if e.native_key is None and e.base_file == base_file:
                    out[e.key] = f.get_tensor(e.key).to(e.dtype)
    for e in shard:
        if e.native_key is not None:
            out[e.key] = from_checkpoint.pop(e.native_key).to(e.dtype)  # frees each stored copy once cast
    return {e.key: out[e.key] for e in shard}


def _write_weights(
    checkpoint: Path, trained: dict[str, TensorStorageMetadata], entries: list[_Entry], max_bytes: int, out_dir: Path
) -> None:
    """Write ``model-0000i-of-0000N.safetensors`` shards and ``model.safetensors.index.json``."""
    shards = _shards(entries, max_bytes)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(_shard_tensors(checkpoint, trained, shard), out_dir / name, metadata={"format": "pt"})
        weight_map.update({e.key: name for e in shard})
        logger.info("wrote %s (%d tensors)", name, len(shard))
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _copy_non_weight_files(base: Path, out_dir: Path) -> None:
    """Copy the base's top-level files but weights (any format) and hidden files."""
    for path in sorted(base.iterdir()):
        if path.is_file() and not path.name.startswith(".") and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, out_dir / path.name)


def set_rope_theta(config: dict[str, Any], rope_theta: float) -> None:
    """Set the language model's ``rope_theta`` in ``config`` (a parsed config.json) in place,
    wherever this config's layout holds it: top level (published flat layout, next to
    ``rope_scaling``), ``text_config``, or ``text_config.rope_parameters`` (nested layout).
    The vision tower's own RoPE settings are left alone."""
    text = config.get("text_config") or {}
    candidates = [config, config.get("rope_parameters"), text, text.get("rope_parameters"), text.get("rope_scaling")]
    homes = [d for d in candidates if isinstance(d, dict) and "rope_theta" in d]
    if not homes:
        rope = text.get("rope_parameters") or config.get("rope_parameters")
        homes = [rope if isinstance(rope, dict) else config]
    for home in homes:
        home["rope_theta"] = rope_theta


def set_dtype(config: dict[str, Any], dtype: torch.dtype) -> None:
    """Set ``dtype``/``torch_dtype`` in ``config`` and its sub-configs in place (wherever the
    config has them; ``torch_dtype`` at the top level when it has neither)."""
    name = str(dtype).removeprefix("torch.")
    sections = [config] + [v for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]
    homes = [(s, k) for s in sections for k in ("dtype", "torch_dtype") if k in s]
    for section, key in homes or [(config, "torch_dtype")]:
        section[key] = name


def _write_config(base: Path, out_dir: Path, rope_theta: float | None, dtype: torch.dtype | None) -> None:
    """Write the base's config.json with the run's ``rope_theta`` and ``dtype`` (when set) and
    the family's extra fields (Qwen2.5-VL: the position rule the run trained with,
    :data:`POSITION_RULE_KEY`)."""
    config = read_hf_config(base)
    config.update(model_family(config).export_config_fields)
    if rope_theta is not None:
        set_rope_theta(config, rope_theta)
    if dtype is not None:
        set_dtype(config, dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_hf_checkpoint(
    checkpoint: Path,
    base: Path,
    output: Path,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write a training checkpoint as a Hugging Face model directory shaped like ``base``.

    Args:
        checkpoint: a ``<output_dir>/checkpoints/step_N`` directory: DCP files whose
            ``model`` entry is the native state dict, and the run's ``config.yaml``.
        base: the HF model directory the run started from (config.json, safetensors).
        output: directory to create; written as ``<output>.tmp-<pid>`` and renamed at the end.
        dtype: dtype of every floating tensor; default: each tensor's dtype in the base.
        max_shard_size: bytes per safetensors shard at most (an int, or e.g. ``"5GB"``).

    Returns:
        ``output``.

    Raises:
        FileNotFoundError: a missing checkpoint file (named), or a base without weights.
        FileExistsError: ``output`` exists and is not an empty directory.
        ValueError: a truncated or corrupt file (named), a checkpoint tensor with no place
            in the base (named), a tensor of the base or the checkpoint whose shape is not
            the one the base's config.json gives (names it, both shapes and the config
            key), or a bad shard size; all before anything is written.
    """
    checkpoint, base, output = Path(checkpoint), Path(base), Path(output)
    max_bytes = parse_size(max_shard_size)
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise FileExistsError(f"{output} already exists: remove it or choose another output directory")
    trained = model_tensor_metadata(read_checkpoint_metadata(checkpoint))
    rope_theta = _run_rope_theta(checkpoint, base)
    base_tensors = _base_tensors(base)
    base_config = read_hf_config(base)
    family = model_family(base_config)
    _check_shapes(checkpoint, trained, base, base_config, family)
    entries = _plan(base_tensors, trained, dtype, family, family.ties_embeddings(base_config))
    copied = [e.key for e in entries if e.native_key is None]
    if copied:
        logger.info(
            "%d tensors the run did not train are copied from %s: %s ...", len(copied), base, ", ".join(copied[:3])
        )

    tmp = output.with_name(f"{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _copy_non_weight_files(base, tmp)
        _write_config(base, tmp, rope_theta, dtype)
        _write_weights(checkpoint, trained, entries, max_bytes, tmp)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
