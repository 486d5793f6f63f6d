"""The tensors of a LLaVA-OneVision Hugging Face checkpoint as its ``config.json`` describes them.

Derived from the native model the config builds (on the meta device: nothing is allocated),
through the key map, so the table can never disagree with the model that loads it.
"""

from typing import Any

import torch

from omnilong.models.key_map import Dim
from omnilong.models.llava_onevision._convert_weights import native_to_hf
from omnilong.models.llava_onevision._model_builders import llava_onevision
from omnilong.models.llava_onevision.args import text_args_from_hf_config, vision_args_from_hf_config


def hf_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[Dim, ...]]:
    """Every tensor (hub key layout) of a checkpoint with this parsed ``config.json``, each
    dimension with the config section it comes from; ``language_model.lm_head.weight`` is left
    out when :func:`ties_embeddings`.

    Raises:
        ValueError: the config describes a model the native code does not implement.
    """
    with torch.device("meta"):
        model = llava_onevision(text_args_from_hf_config(config), vision_args_from_hf_config(config))
    state = {k: v for k, v in model.state_dict().items() if not (k == "output.weight" and ties_embeddings(config))}
    where = lambda key: "vision_config" if key.startswith("visual.") else "text_config / vision_config"  # noqa: E731
    return {
        hub: tuple((size, where(native)) for size in tensor.shape)
        for native, (hub, tensor) in zip(state, native_to_hf(state).items())
    }


def ties_embeddings(config: dict[str, Any]) -> bool:
    """Whether the output projection is the token embedding (no ``language_model.lm_head.weight``)."""
    return bool(config.get("tie_word_embeddings") or (config.get("text_config") or {}).get("tie_word_embeddings"))
