"""Checking Hugging Face weights against a ``config.json`` from the safetensors headers alone
(no tensor is read), so that a disagreement is named by tensor, file and config key before
any model is built or any file is written."""

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from omnilong.hf_io import INDEX_NAME, hf_weight_files
from omnilong.models.families import model_family
from omnilong.models.key_map import Dim

_SHOWN = 3  # problems named in one message; the rest are counted


def shape_problem(key: str, shape: tuple[int, ...], expected: tuple[Dim, ...], where: str) -> str | None:
    """None when ``shape`` is the ``expected`` one, else a sentence naming the tensor, both
    shapes and the config keys of the dimensions that differ."""
    sizes = tuple(size for size, _ in expected)
    if tuple(shape) == sizes:
        return None
    if len(shape) != len(sizes):
        keys = ", ".join(dict.fromkeys(k for _, k in expected))
    else:
        keys = ", ".join(dict.fromkeys(f"{k} = {size}" for (size, k), got in zip(expected, shape) if size != got))
    return f"{key} is {tuple(shape)} in {where}, but config.json gives {sizes} ({keys})"


def _raise(model_dir: Path, problems: list[str]) -> None:
    if problems:
        more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise ValueError(f"{model_dir} does not match its config.json: {'; '.join(problems[:_SHOWN])}{more}")


def check_hf_weights(model_dir: Path, config: dict[str, Any]) -> None:
    """Check that the safetensors files of ``model_dir`` hold exactly the tensors its parsed
    ``config`` describes, in the shapes it describes.

    Raises:
        FileNotFoundError: no weights, or a shard named by the index is missing.
        ValueError: a tensor that is missing (names the file the index puts it in), has
            another shape (names the file, both shapes and the config key), or that the
            config does not describe; a weight file that cannot be read.
    """
    model_dir = Path(model_dir)
    family = model_family(config)
    to_hub_layout, expected = family.to_hub_layout, family.hf_tensor_shapes(config)
    found: dict[str, tuple[str, Path, tuple[int, ...]]] = {}  # hub key -> (file's key, file, shape)
    for path in hf_weight_files(model_dir):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    found[to_hub_layout(key)] = (key, path, tuple(f.get_slice(key).get_shape()))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read safetensors file {path} (truncated or corrupt?): {e}") from e
    index = model_dir / INDEX_NAME
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
    problems = []
    for hub_key, dims in expected.items():
        if hub_key == "lm_head.weight" and hub_key not in found and family.ties_embeddings(config):
            continue
        if hub_key not in found:
            file_key = next((k for k in weight_map if to_hub_layout(k) == hub_key), None)
            problems.append(
                f"{file_key} is missing from {model_dir / weight_map[file_key]}, where {INDEX_NAME} puts it"
                if file_key is not None
                else f"{hub_key} is in no weight file of {model_dir}"
            )
            continue
        key, path, shape = found[hub_key]
        problem = shape_problem(key, shape, dims, path.name)
        if problem is not None:
            problems.append(problem)
    for hub_key, (key, path, _) in found.items():
        if hub_key not in expected and not (hub_key.startswith("visual.") and not config.get("vision_config")):
            problems.append(f"{path.name} holds {key}, which config.json does not describe")
    _raise(model_dir, problems)
