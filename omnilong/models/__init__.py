from omnilong.models.hf_loading import build_model_from_hf_config, load_hf_model
from omnilong.models.llava_onevision import LlavaOnevision, llava_onevision, llava_onevision_7b
from omnilong.models.qwen2_5_vl import Qwen2_5_VL, qwen2_5_vl, qwen2_5_vl_7b

__all__ = [
    "LlavaOnevision",
    "Qwen2_5_VL",
    "build_model_from_hf_config",
    "llava_onevision",
    "llava_onevision_7b",
    "load_hf_model",
    "qwen2_5_vl",
    "qwen2_5_vl_7b",
]
