from omnilong.models.qwen2_5_vl._model_builders import qwen2_5_vl, qwen2_5_vl_7b, qwen2_5_vl_vision
from omnilong.models.qwen2_5_vl.args import (
    Qwen2_5_VLTextArgs,
    Qwen2_5_VLVisionArgs,
    text_args_from_hf_config,
    vision_args_from_hf_config,
)
from omnilong.models.qwen2_5_vl.model import Qwen2_5_VL
from omnilong.models.qwen2_5_vl.rope_index import rope_index
from omnilong.models.qwen2_5_vl.vision import VisionTransformer

__all__ = [
    "Qwen2_5_VL",
    "Qwen2_5_VLTextArgs",
    "Qwen2_5_VLVisionArgs",
    "VisionTransformer",
    "qwen2_5_vl",
    "qwen2_5_vl_7b",
    "qwen2_5_vl_vision",
    "rope_index",
    "text_args_from_hf_config",
    "vision_args_from_hf_config",
]
