from omnilong.models.qwen2_5_vl._model_builders import qwen2_5_vl, qwen2_5_vl_7b
from omnilong.models.qwen2_5_vl.args import Qwen2_5_VLTextArgs, text_args_from_hf_config
from omnilong.models.qwen2_5_vl.model import Qwen2_5_VL

__all__ = ["Qwen2_5_VL", "Qwen2_5_VLTextArgs", "qwen2_5_vl", "qwen2_5_vl_7b", "text_args_from_hf_config"]
