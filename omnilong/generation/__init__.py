"""Inference for the native models: a key/value cache attached through the attention core
(context-parallel aware), greedy generation, teacher-forced predictions, checkpoint loading."""

from omnilong.generation.generate import Generation, cached_logits, forced_predictions, greedy_generate
from omnilong.generation.kv_cache import kv_cache
from omnilong.generation.loading import InferenceModel, load_inference_model

__all__ = [
    "Generation",
    "InferenceModel",
    "cached_logits",
    "forced_predictions",
    "greedy_generate",
    "kv_cache",
    "load_inference_model",
]
