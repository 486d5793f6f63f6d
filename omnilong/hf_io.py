"""Reading Hugging Face model directories: ``config.json`` and safetensors shards.

Weights are read from safetensors only (never pickle).
"""

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF model directory.

    Raises:
        FileNotFoundError: the directory or its config.json is missing (says how to get one).
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: checkpoint_dir must be a local Hugging Face model directory "
            "(e.g. `hf download Qwen/Qwen2.5-VL-7B-Instruct --local-dir <dir>`)"
        )
    with open(config_path) as f:
        return json.load(f)


def hf_weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of an HF model directory (from its index when sharded).

    Raises:
        FileNotFoundError: no weights, or a shard named by the index is missing.
    """
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        with open(index_path) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [model_dir / name for name in names]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{index_path} names shards that are missing: {missing}")
        return files
    single = model_dir / SINGLE_FILE_NAME
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no {INDEX_NAME} or {SINGLE_FILE_NAME} in {model_dir}")


def read_hf_state_dict(model_dir: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of an HF model directory, on CPU, optionally cast to ``dtype``.

    Raises:
        ValueError: a shard is truncated or not a safetensors file (names the file).
    """
    state_dict: dict[str, torch.Tensor] = {}
    for path in hf_weight_files(model_dir):
        try:
            tensors = load_file(path, device="cpu")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read safetensors file {path} (truncated or corrupt?): {e}") from e
        for key, tensor in tensors.items():
            state_dict[key] = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
    return state_dict
