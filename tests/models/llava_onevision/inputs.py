"""Inputs for the LLaVA-OneVision tests: random images and videos, and the tiny checkpoint's
processor output for a chat about them (transformers is imported only when it is used, so
multi-process workers that import this module start fast)."""

import numpy as np


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    """``[height, width, 3]`` uint8."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def random_video(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """``[frames, height, width, 3]`` uint8."""
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def processor_inputs(path, content: list[dict], videos=None, images=None) -> dict:
    """The whole output of the checkpoint's ``LlavaOnevisionProcessor`` for a user turn of
    ``content`` (transformers' multimodal message items) and an assistant answer."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    messages = [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
    ]
    text = processor.apply_chat_template(messages)
    return dict(processor(text=[text], images=images, videos=videos, return_tensors="pt"))
