"""Native models from local Hugging Face model directories."""

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilong.hf_io import read_hf_config, read_hf_state_dict
from omnilong.models.families import model_family

logger = logging.getLogger(__name__)


def build_model_from_hf_config(config: dict[str, Any], **text_overrides: Any) -> nn.Module:
    """The native model (random init) described by a parsed ``config.json`` (its family from
    ``model_type``: :mod:`omnilong.models.families`), with its vision tower when the config
    has a ``vision_config``.

    Build it under ``torch.device("meta")`` to allocate nothing. ``text_overrides`` replace
    fields of the language model's args (e.g. ``rope_theta``).

    Raises:
        ValueError: the model type is not one OmniLong implements.
    """
    return model_family(config).build(config, **text_overrides)


def load_native_state_dict(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every weight of an HF model directory under native key names (vision tower included).

    Raises:
        ValueError: the checkpoint has keys that match nothing in the key map.
    """
    family = model_family(read_hf_config(model_dir))
    native, _, unknown = family.hf_to_native(read_hf_state_dict(model_dir, dtype))
    if unknown:
        raise ValueError(f"{model_dir} has {len(unknown)} keys that match no native parameter: {sorted(unknown)[:20]}")
    return native


def check_state_dict_matches(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate ``state_dict`` against ``model`` (tied output weight filled in when absent).

    A text-only model (no ``visual`` tower) takes the language-model tensors of a full
    checkpoint; the vision-tower tensors it leaves out are reported in the log (count and
    first names), never silently dropped.

    Raises:
        ValueError: naming every missing key, unexpected key and shape mismatch.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(model, "visual", None) is None:
        vision = sorted(k for k in state_dict if k.startswith("visual."))
        if vision:
            logger.warning(
                "the model has no vision tower: %d vision-tower tensors of the checkpoint are not loaded: %s ...",
                len(vision),
                ", ".join(vision[:3]),
            )
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("visual.")}
    if (
        "output.weight" in expected
        and "output.weight" not in state_dict
        and getattr(model.args, "tie_word_embeddings", False)
    ):
        state_dict = {**state_dict, "output.weight": state_dict["tok_embeddings.weight"]}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != expected[k]
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            "checkpoint does not match the model: "
            f"missing keys {missing}; unexpected keys {unexpected}; shape mismatches {mismatched}"
        )
    return state_dict


def load_hf_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """The native model with the weights of a local HF model directory.

    Args:
        path: directory with ``config.json`` and safetensors weights (single file or
            shards with ``model.safetensors.index.json``).
        dtype: dtype of the floating-point weights.
        device: where the model lives.

    Returns:
        The native model in train mode.
    """
    config = read_hf_config(path)
    with torch.device("meta"):
        model = build_model_from_hf_config(config)
    state_dict = check_state_dict_matches(model, load_native_state_dict(path, dtype))
    model.load_state_dict(state_dict, assign=True)
    if model.args.tie_word_embeddings:  # assign=True replaced the shared parameter twice
        model.output.weight = model.tok_embeddings.weight
    return model.to(device)
