"""How a model family turns a prompt into model inputs: the one per-family interface of the
evaluations and of generation.

A family provides (see :class:`ModelFamily`):

* ``prompt_inputs(prompt, answer)``: a :class:`Prompt` (text, images, one video) rendered with
  the checkpoint's chat template as one user turn (images, then the video, then the text)
  and the assistant's generation prompt, vision inputs processed as the model's processor
  does; optionally an answer appended (teacher forcing). Returns ``model(**inputs)``-ready
  tensors of one row (``input_ids [1, T]`` + vision keys) and the answer's token count;
* ``stop_token_ids``: the tokens that end an answer;
* ``frames_per_step``: how many consecutive video frames the model encodes together
  (Qwen2.5-VL: 2, its temporal patch; a per-frame encoder: 1): a needle frame is inserted
  as that many copies at a multiple of it, so it never shares a step with a haystack frame;
* ``video_options``: frame sampling and pixel limits for videos;
* ``frame_feature_cache(model)``: a context manager yielding an object whose
  ``expect(keys)`` names the encoding steps (``frames_per_step`` frames each) of the next
  video forward, so that steps with a known key reuse their features (V-NIAH's haystack is
  encoded once for all depths).

Families are looked up by the checkpoint's ``model_type`` (:func:`family_for`): Qwen2.5-VL
(:class:`Qwen2_5_VLFamily`, here) and LLaVA-OneVision
(:class:`~omnilong.eval.llava_family.LlavaOnevisionFamily`).
"""

import json
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from omnilong.data.chat import check_texts_rendered
from omnilong.data.video import (
    DecodedVideo,
    Patching,
    VideoOptions,
    num_video_tokens,
    process_video,
    resized_sizes,
    smart_resize,
    torchcodec_decoders,
)
from omnilong.eval.vision_cache import FramePairCache, frame_pair_cache
from omnilong.hf_io import read_hf_config


@dataclass(frozen=True)
class Prompt:
    """One user turn.

    Attributes:
        text: the question / instruction.
        images: ``[3, H, W]`` uint8 RGB images, shown before the video and the text.
        video: decoded frames (``[T, 3, H, W]`` uint8 and their fps), shown before the text.
    """

    text: str
    images: tuple[torch.Tensor, ...] = field(default_factory=tuple)
    video: DecodedVideo | None = None


def read_image(path: Path) -> torch.Tensor:
    """``[3, H, W]`` uint8 RGB of an image file (PNG, JPEG, ...).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a decodable image.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: image not found")
    decoders = torchcodec_decoders()
    try:
        return decoders.decode_image(Path(path), mode="RGB")
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: cannot decode image ({str(e).splitlines()[0][:200]})") from e


def render_prompt(tokenizer: Any, prompt: Prompt, answer: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompt`` as one user turn (images, then the video, then the text) with the checkpoint's
    chat template and the assistant's generation prompt: its token ids ``[T]`` (one placeholder
    token per image / video, for the family to expand) and ``answer``'s ``[A]`` (empty without one).

    Raises:
        ValueError: the template drops the prompt's text (names the template).
    """
    content = [{"type": "image"} for _ in prompt.images]
    content += [{"type": "video"}] if prompt.video is not None else []
    content.append({"type": "text", "text": prompt.text})
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    check_texts_rendered(tokenizer, [{"role": "user", "content": prompt.text}], text)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    answer_ids = torch.tensor(
        tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else [], dtype=torch.long
    )
    return ids, answer_ids


class ModelFamily(Protocol):
    """What the evaluations need of a model family (module docstring)."""

    frames_per_step: int
    video_options: VideoOptions

    @property
    def stop_token_ids(self) -> list[int]: ...

    def prompt_inputs(self, prompt: Prompt, answer: str | None = None) -> tuple[dict[str, torch.Tensor], int]: ...

    def frame_feature_cache(self, model: nn.Module) -> AbstractContextManager[Any]: ...


def _pixel_bounds(model_dir: Path, name: str, default: tuple[int, int]) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` of a processor config file (``size.shortest_edge`` /
    ``longest_edge`` or ``min_pixels`` / ``max_pixels``), ``default`` when absent."""
    path = model_dir / name
    if not path.is_file():
        return default
    cfg = json.loads(path.read_text())
    size = cfg.get("size") or {}
    return (
        int(size.get("shortest_edge", cfg.get("min_pixels", default[0]))),
        int(size.get("longest_edge", cfg.get("max_pixels", default[1]))),
    )


class Qwen2_5_VLFamily:
    """Qwen2.5-VL: ChatML with ``<|vision_start|><|image_pad|>/<|video_pad|><|vision_end|>``
    placeholders, each pad expanded to the item's LLM token count; videos and images processed
    as transformers' Qwen2-VL processors do (:mod:`omnilong.data.video`; an image is one frame
    repeated over the temporal patch).

    Args:
        tokenizer: the checkpoint's tokenizer (with its chat template).
        model_dir: the Hugging Face directory (config.json gives the tower's patching, processor
            configs the pixel limits).
        fps, max_frames: video frame sampling.
        video_min_pixels, video_max_pixels, video_total_pixels: override the processor's limits.
    """

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
        self.tokenizer = tokenizer
        self.patching = Patching.from_model_config(read_hf_config(model_dir))
        self.frames_per_step = self.patching.temporal
        factor = self.patching.factor
        video_bounds = _pixel_bounds(model_dir, "video_preprocessor_config.json", (128 * factor**2, 768 * factor**2))
        self.image_bounds = _pixel_bounds(model_dir, "preprocessor_config.json", (56 * 56, 1280 * factor**2))
        self.video_options = VideoOptions(
            fps,
            max_frames,
            video_min_pixels or video_bounds[0],
            video_max_pixels or video_bounds[1],
            video_total_pixels,
        )
        vocab = tokenizer.get_vocab()
        missing = [t for t in ("<|image_pad|>", "<|video_pad|>", "<|im_end|>") if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks {missing}: not a Qwen2.5-VL tokenizer")
        self.image_pad, self.video_pad = vocab["<|image_pad|>"], vocab["<|video_pad|>"]
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self._stops = sorted({vocab["<|im_end|>"], *eos})

    @property
    def stop_token_ids(self) -> list[int]:
        """``<|im_end|>`` and the tokenizer's EOS."""
        return self._stops

    def frame_feature_cache(self, model: nn.Module) -> AbstractContextManager[FramePairCache]:
        """Frame-pair features reused by key (:func:`~omnilong.eval.vision_cache.frame_pair_cache`)."""
        return frame_pair_cache(model)

    def _image_inputs(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = smart_resize(image.shape[-2], image.shape[-1], *self.image_bounds, self.patching.factor)
        vision = process_video(DecodedVideo(image[None], fps=1.0), h, w, self.patching)
        return {"pixel_values": vision["pixel_values_videos"], "image_grid_thw": vision["video_grid_thw"]}

    def prompt_inputs(self, prompt: Prompt, answer: str | None = None) -> tuple[dict[str, torch.Tensor], int]:
        """Model inputs of ``prompt`` (+ ``answer``), see the module docstring.

        Returns:
            ``(inputs, answer_length)``: ``input_ids [1, T]``, and ``pixel_values`` /
            ``image_grid_thw``, ``pixel_values_videos`` / ``video_grid_thw`` /
            ``second_per_grid_ts`` when there are images / a video.
        """
        ids, answer_ids = render_prompt(self.tokenizer, prompt, answer)
        inputs: dict[str, torch.Tensor] = {}
        repeats = torch.ones_like(ids)
        if prompt.images:
            images = [self._image_inputs(image) for image in prompt.images]
            inputs["pixel_values"] = torch.cat([i["pixel_values"] for i in images])
            inputs["image_grid_thw"] = torch.cat([i["image_grid_thw"] for i in images])
            repeats[ids == self.image_pad] = inputs["image_grid_thw"].prod(-1) // self.patching.merge**2
        if prompt.video is not None:
            ((h, w),) = resized_sizes([prompt.video], self.video_options, self.patching)
            inputs.update(process_video(prompt.video, h, w, self.patching))
            repeats[ids == self.video_pad] = num_video_tokens(prompt.video.frames.shape[0], h, w, self.patching)
        input_ids = torch.cat([ids.repeat_interleave(repeats), answer_ids])
        return {"input_ids": input_ids[None], **inputs}, len(answer_ids)


def family_for(model_type: str, tokenizer: Any, model_dir: Path, **video: Any) -> ModelFamily:
    """The :class:`ModelFamily` of a checkpoint's ``model_type`` (``video``: fps, max_frames,
    pixel limits).

    Raises:
        ValueError: a model type no family serves.
    """
    if model_type == "qwen2_5_vl":
        return Qwen2_5_VLFamily(tokenizer, Path(model_dir), **video)
    if model_type == "llava_onevision":
        from omnilong.eval.llava_family import LlavaOnevisionFamily  # it imports Prompt from here

        return LlavaOnevisionFamily(tokenizer, Path(model_dir), **video)
    raise ValueError(f"no evaluation family for model_type {model_type!r}; supported: qwen2_5_vl, llava_onevision")
