"""The LLaVA-OneVision evaluation family (see :mod:`omnilong.eval.family` for the interface).

ChatML with no default system turn; a user turn of list contents renders each image as
``<image>\\n``, then each video as ``<video>\\n``, then the text (the checkpoint's template).
Each ``<image>`` is expanded to the image's anyres token count and each ``<video>`` to
``frames * pooled^2 + 1``, as ``LlavaOnevisionProcessor`` does. Videos are processed natively
(:class:`~omnilong.data.llava_video.LlavaVideoFormat`, bitwise the video processor's); images
by the checkpoint's own ``LlavaOnevisionImageProcessor`` (anyres crops), their token counts
by the model's own packing rule (:func:`~omnilong.models.llava_onevision.features.pack_image_features`).
Positions are 1-D (text positions along the row). The tower encodes every frame on its own:
one frame per encoding step, features reused by key (:class:`~omnilong.eval.vision_cache.FrameCache`).
"""

import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilong.data.llava_video import IMAGE_TOKEN, VIDEO_TOKEN, LlavaVideoFormat
from omnilong.data.video import VideoOptions
from omnilong.eval.family import Prompt, render_prompt
from omnilong.eval.vision_cache import FrameCache, frame_cache
from omnilong.hf_io import read_hf_config
from omnilong.models.llava_onevision.args import text_args_from_hf_config, vision_args_from_hf_config
from omnilong.models.llava_onevision.features import num_crops, pack_image_features


def _processor_config(model_dir: Path, name: str, key: str) -> dict[str, Any] | None:
    """A processor's config: ``name`` (the hub's ``preprocessor_config.json`` /
    ``video_preprocessor_config.json``) or ``processor_config.json``'s ``key`` entry (as
    transformers v5 saves a processor); ``None`` when neither is there."""
    if (model_dir / name).is_file():
        return json.loads((model_dir / name).read_text())
    if (model_dir / "processor_config.json").is_file():
        return json.loads((model_dir / "processor_config.json").read_text()).get(key)
    return None


class LlavaOnevisionFamily:
    """LLaVA-OneVision (module docstring).

    Args:
        tokenizer: the checkpoint's tokenizer (with its chat template, ``<image>`` and ``<video>``).
        model_dir: the Hugging Face directory (``config.json``, processor configs).
        fps, max_frames: video frame sampling.
        video_min_pixels, video_max_pixels, video_total_pixels: must be ``None``: frames are
            resized to the tower's square crop, so pixel limits do not apply.

    Raises:
        ValueError: pixel limits given, or a tokenizer without the LLaVA tokens.
        FileNotFoundError: (images only) no image processor config in ``model_dir``.
    """

    frames_per_step = 1

    def __init__(
        self,
        tokenizer: Any,
        model_dir: Path,
        fps: float = 1.0,
        max_frames: int = 768,
        video_min_pixels: int | None = None,
        video_max_pixels: int | None = None,
        video_total_pixels: int | None = None,
    ):
        limits = {
            "video_min_pixels": video_min_pixels,
            "video_max_pixels": video_max_pixels,
            "video_total_pixels": video_total_pixels,
        }
        given = [name for name, value in limits.items() if value is not None]
        if given:
            raise ValueError(
                f"{given} do not apply to LLaVA-OneVision (every frame is resized to the "
                "tower's square crop): leave them out"
            )
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IMAGE_TOKEN, VIDEO_TOKEN, "<|im_end|>") if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks {missing}: not a LLaVA-OneVision tokenizer")
        self.tokenizer, self.model_dir = tokenizer, Path(model_dir)
        config = read_hf_config(self.model_dir)
        self.args, self.vision_args = text_args_from_hf_config(config), vision_args_from_hf_config(config)
        self.image_token, self.video_token = vocab[IMAGE_TOKEN], vocab[VIDEO_TOKEN]
        norm = _processor_config(self.model_dir, "video_preprocessor_config.json", "video_processor") or {}
        self.video_format = LlavaVideoFormat(
            self.vision_args.image_size,
            self.vision_args.patch_size,
            **{field: tuple(norm[key]) for field, key in (("mean", "image_mean"), ("std", "image_std")) if key in norm},
        )
        self.video_options = VideoOptions(fps, max_frames)
        self._stops = sorted({vocab["<|im_end|>"], *(vocab[t] for t in ("<|endoftext|>",) if t in vocab)})
        self._image_processor = None

    @property
    def stop_token_ids(self) -> list[int]:
        """``<|im_end|>`` and ``<|endoftext|>``."""
        return self._stops

    def frame_feature_cache(self, model: nn.Module) -> AbstractContextManager[FrameCache]:
        """Per-frame tower features reused by key (:func:`~omnilong.eval.vision_cache.frame_cache`)."""
        return frame_cache(model)

    def image_tokens(self, image_size: tuple[int, int], several: bool) -> int:
        """``<image>`` tokens of an image of ``(height, width)``: its anyres crops packed by the
        model's rule (``several``: one of several images of a prompt, its base crop only)."""
        crops = (
            1 if several else num_crops(list(image_size), self.args.image_grid_pinpoints, self.vision_args.image_size)
        )
        features = self.vision_args.grid**2 - (self.args.vision_feature_select_strategy == "default")
        return pack_image_features(
            torch.zeros(crops, features, 1),
            list(image_size),
            torch.zeros(1),
            self.args.image_grid_pinpoints,
            self.vision_args.image_size,
            self.args.max_image_crops,
        ).shape[0]

    def _image_inputs(self, images: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """``pixel_values [n, max_crops, 3, S, S]``, ``image_sizes [n, 2]``, ``batch_num_images [1]``
        of one prompt's images, by the checkpoint's image processor."""
        if self._image_processor is None:
            from transformers import AutoImageProcessor

            if _processor_config(self.model_dir, "preprocessor_config.json", "image_processor") is None:
                raise FileNotFoundError(
                    f"{self.model_dir}: no preprocessor_config.json (nor processor_config.json "
                    "with an image_processor): images need the checkpoint's image processor "
                    "(copy it from the base model's directory)"
                )
            self._image_processor = AutoImageProcessor.from_pretrained(self.model_dir)
        out = self._image_processor(images=[list(images)], return_tensors="pt")
        return {key: out[key] for key in ("pixel_values", "image_sizes", "batch_num_images")}

    def prompt_inputs(self, prompt: Prompt, answer: str | None = None) -> tuple[dict[str, torch.Tensor], int]:
        """Model inputs of ``prompt`` (+ ``answer``), see :mod:`omnilong.eval.family`.

        Returns:
            ``(inputs, answer_length)``: ``input_ids [1, T]``, and ``pixel_values`` /
            ``image_sizes`` / ``batch_num_images``, ``pixel_values_videos [frames, 3, S, S]`` /
            ``video_num_frames [1]`` when there are images / a video.
        """
        ids, answer_ids = render_prompt(self.tokenizer, prompt, answer)
        inputs: dict[str, torch.Tensor] = {}
        repeats = torch.ones_like(ids)
        if prompt.images:
            inputs.update(self._image_inputs(prompt.images))
            several = len(prompt.images) > 1
            repeats[ids == self.image_token] = torch.tensor(
                [self.image_tokens(tuple(size), several) for size in inputs["image_sizes"].tolist()]
            )
        if prompt.video is not None:
            size = (self.video_format.crop, self.video_format.crop)
            inputs.update(self.video_format.process(prompt.video, size))
            repeats[ids == self.video_token] = self.video_format.num_tokens(prompt.video.frames.shape[0], size)
        input_ids = torch.cat([ids.repeat_interleave(repeats), answer_ids])
        return {"input_ids": input_ids[None], **inputs}, len(answer_ids)
