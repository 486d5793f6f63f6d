"""The model families OmniLong implements, chosen by a checkpoint's ``config.json`` ``model_type``.

A family is what the shared code (loading, checking, export) needs of a model, as data: how
to build it from a config and how its checkpoint keys map. What the recipe needs of a
built model is its interface: ``model.with_positions(batch)`` (positions of a full-sequence
batch, before any context-parallel cut) and ``model.vision_token_ids`` (the tokens vision
features replace).
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from omnilong.models import llava_onevision as llava
from omnilong.models import qwen2_5_vl as qwen
from omnilong.models.llava_onevision import _convert_weights as llava_keys
from omnilong.models.llava_onevision import _hf_shapes as llava_shapes
from omnilong.models.qwen2_5_vl import _convert_weights as qwen_keys
from omnilong.models.qwen2_5_vl import _hf_shapes as qwen_shapes
from omnilong.models.qwen2_5_vl.rope_index import POSITION_RULE


@dataclass(frozen=True)
class ModelFamily:
    """One family's builder and checkpoint adapter.

    Attributes:
        build: ``build(config, **text_overrides)`` -> the native model (random init).
        hf_to_native: HF state dict (either layout) -> ``(native, vision_keys, unknown_keys)``.
        native_to_hf: native state dict -> hub layout.
        to_hub_layout: one key of either layout -> its hub name.
        hf_tensor_shapes: config -> ``{hub key: ((size, config key), ...)}``.
        ties_embeddings: config -> whether the output projection is the embedding.
        export_config_fields: fields an export adds to config.json.
    """

    build: Callable[..., nn.Module]
    hf_to_native: Callable
    native_to_hf: Callable
    to_hub_layout: Callable[[str], str]
    hf_tensor_shapes: Callable
    ties_embeddings: Callable[[dict], bool]
    export_config_fields: dict[str, Any]


def _build_qwen(config: dict[str, Any], **text_overrides: Any) -> nn.Module:
    text_args = replace(qwen.text_args_from_hf_config(config), **text_overrides)
    return qwen.qwen2_5_vl(text_args, qwen.vision_args_from_hf_config(config))


def _build_llava(config: dict[str, Any], **text_overrides: Any) -> nn.Module:
    text_args = replace(llava.text_args_from_hf_config(config), **text_overrides)
    return llava.llava_onevision(text_args, llava.vision_args_from_hf_config(config))


FAMILIES: dict[str, ModelFamily] = {
    "qwen2_5_vl": ModelFamily(
        _build_qwen,
        qwen_keys.hf_to_native,
        qwen_keys.native_to_hf,
        qwen_keys.to_hub_layout,
        qwen_shapes.hf_tensor_shapes,
        qwen_shapes.ties_embeddings,
        # the M-RoPE rule the run trained with (see omnilong.checkpoint.hf_export)
        {"omnilong_mrope_positions": POSITION_RULE},
    ),
    "llava_onevision": ModelFamily(
        _build_llava,
        llava_keys.hf_to_native,
        llava_keys.native_to_hf,
        llava_keys.to_hub_layout,
        llava_shapes.hf_tensor_shapes,
        llava_shapes.ties_embeddings,
        {},
    ),
}


def model_family(config: dict[str, Any]) -> ModelFamily:
    """The family of a parsed ``config.json``.

    Raises:
        ValueError: a ``model_type`` OmniLong does not implement (names the supported ones).
    """
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"config.json model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]
