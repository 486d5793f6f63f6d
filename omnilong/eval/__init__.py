"""Evaluations: text needle in a haystack, visual needle in a haystack, Video-MME; model
families plug in through :class:`omnilong.eval.family.ModelFamily`."""

from omnilong.eval.family import ModelFamily, Prompt, Qwen2_5_VLFamily, family_for
from omnilong.eval.llava_family import LlavaOnevisionFamily
from omnilong.eval.niah import run_niah
from omnilong.eval.videomme import run_videomme
from omnilong.eval.vniah import run_vniah

__all__ = [
    "LlavaOnevisionFamily",
    "ModelFamily",
    "Prompt",
    "Qwen2_5_VLFamily",
    "family_for",
    "run_niah",
    "run_videomme",
    "run_vniah",
]
