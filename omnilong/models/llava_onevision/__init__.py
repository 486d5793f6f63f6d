from omnilong.models.llava_onevision._model_builders import llava_onevision, llava_onevision_7b
from omnilong.models.llava_onevision.args import (
    LlavaOnevisionTextArgs,
    SiglipVisionArgs,
    text_args_from_hf_config,
    vision_args_from_hf_config,
)
from omnilong.models.llava_onevision.model import LlavaOnevision
from omnilong.models.llava_onevision.vision import SiglipVisionTower

__all__ = [
    "LlavaOnevision",
    "LlavaOnevisionTextArgs",
    "SiglipVisionArgs",
    "SiglipVisionTower",
    "llava_onevision",
    "llava_onevision_7b",
    "text_args_from_hf_config",
    "vision_args_from_hf_config",
]
