"""The ``config.json`` of the published checkpoints OmniLong ships configs for, so that their
shapes are known on a machine that has not downloaded them (the dry run, the memory planner).

Only what a model is built from is kept: sizes, token ids, the vision tower's settings.
"""

import copy
from typing import Any

NAMED_MODELS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2.5-VL-7B-Instruct (the published flat layout)
    "qwen2.5-vl-7b": {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-06,
        "max_position_embeddings": 128000,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "torch_dtype": "bfloat16",
        "vision_config": {
            "depth": 32,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
        },
    },
    # llava-hf/llava-onevision-qwen2-7b-ov-hf
    "llava-onevision-7b": {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        "image_token_index": 151646,
        "video_token_index": 151647,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_aspect_ratio": "anyres_max_9",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "qwen2",
            "vocab_size": 152128,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-06,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "use_sliding_window": False,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "image_size": 384,
            "intermediate_size": 4304,
            "num_attention_heads": 16,
            "num_hidden_layers": 26,
            "patch_size": 14,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-06,
            "vision_use_head": False,
        },
    },
}


def named_model_config(name: str) -> dict[str, Any]:
    """A copy of the ``config.json`` of the named model.

    Raises:
        ValueError: an unknown name (lists the known ones).
    """
    if name.lower() not in NAMED_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(NAMED_MODELS)}")
    return copy.deepcopy(NAMED_MODELS[name.lower()])
