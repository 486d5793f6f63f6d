"""Stage 3 video data for LLaVA-OneVision: the video SFT dataset with LLaVA's video format.

A video is decoded as for Qwen2.5-VL (:func:`omnilong.data.video.decode_video`: frames at
``fps``, at most ``max_frames`` spread evenly), each frame resized to the tower's square crop
(384 px for the 7B) and normalised as transformers' ``LlavaOnevisionVideoProcessor`` does (bit
for bit, see ``tests/data/test_llava_video.py``). In the text a video is ``<video>`` repeated
``frames * ceil(grid / 2)^2 + 1`` times (``grid = crop / patch``: 27 -> 14, so 196 tokens per
frame, and one newline per video). Items carry ``pixel_values_videos [frames, 3, crop, crop]``
uint8 (normalised on the model's device: :meth:`LlavaVideoFormat.normalize`) and
``video_num_frames [1]``; a batch concatenates both over its videos.
"""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from omnilong.data.packing import PackedDataset, packed_or_not
from omnilong.data.sources import PathLike, expand_data_files
from omnilong.data.video import DecodedVideo, VideoOptions, normalize_pixels, resize_frames
from omnilong.data.video_sft import VideoSFTDataset, check_model_type, read_video_samples

logger = logging.getLogger(__name__)

VIDEO_TOKEN, IMAGE_TOKEN = "<video>", "<image>"
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # llava-onevision-qwen2-7b-ov-hf's processors


@dataclass(frozen=True)
class LlavaVideoFormat:
    """LLaVA-OneVision's video format.

    Args:
        crop: side of the square frames (the tower's ``image_size`` and the processor's size).
        patch: the tower's patch size.
        mean, std: the video processor's normalisation.
    """

    crop: int = 384
    patch: int = 14
    mean: tuple[float, ...] = SIGLIP_MEAN
    std: tuple[float, ...] = SIGLIP_STD

    model_type = "llava_onevision"
    marker = pad_token = VIDEO_TOKEN
    image_token = IMAGE_TOKEN
    required_tokens = (VIDEO_TOKEN, IMAGE_TOKEN)

    def __post_init__(self):
        if not 0 < self.patch <= self.crop:  # 384 px of 14 px patches: 27 per side, the last 6 px unused
            raise ValueError(f"need 0 < patch_size <= frame_size, got patch_size {self.patch}, frame_size {self.crop}")

    @classmethod
    def from_model_config(
        cls, config: dict[str, Any], mean: Sequence[float] = SIGLIP_MEAN, std: Sequence[float] = SIGLIP_STD
    ) -> "LlavaVideoFormat":
        """The format of the checkpoint with the parsed ``config.json`` ``config``: its tower's
        ``vision_config`` ``image_size`` and ``patch_size``.

        Raises:
            ValueError: not a LLaVA-OneVision checkpoint (:func:`~omnilong.data.video_sft.check_model_type`).
        """
        check_model_type(cls, config)
        vision = config.get("vision_config") or {}
        return cls(vision.get("image_size", cls.crop), vision.get("patch_size", cls.patch), tuple(mean), tuple(std))

    @property
    def tokens_per_frame(self) -> int:
        """``ceil(grid / 2)^2``: 196 for 384 px crops of 14 px patches."""
        return math.ceil(self.crop // self.patch / 2) ** 2

    def sizes(self, shapes: list[tuple[int, int, int]], options: VideoOptions) -> list[tuple[int, int]]:
        return [(self.crop, self.crop)] * len(shapes)

    def num_tokens(self, frames: int, size: tuple[int, int]) -> int:
        return frames * self.tokens_per_frame + 1

    def inputs(self, video: DecodedVideo, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The item's vision inputs: ``pixel_values_videos [T, 3, crop, crop]`` uint8 (the frames
        resized, not yet normalised: :meth:`normalize`) and ``video_num_frames [1]``."""
        frames = resize_frames(video.frames, self.crop, self.crop)  # the frames themselves when decoded at the crop
        return {"pixel_values_videos": frames, "video_num_frames": torch.tensor([frames.shape[0]])}

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[T, 3, crop, crop]`` -> fp32, normalised as the video processor does (bit for bit)."""
        return normalize_pixels(pixels, self.mean, self.std)

    def process(self, video: DecodedVideo, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """:meth:`inputs` normalised: ``pixel_values_videos [T, 3, crop, crop]`` fp32, the video
        processor's, and ``video_num_frames [1]``."""
        inputs = self.inputs(video, size)
        inputs["pixel_values_videos"] = self.normalize(inputs["pixel_values_videos"])
        return inputs

    temporal = 1  # frames per unit the tower encodes on its own

    def process_share(self, video: DecodedVideo, size: tuple[int, int], frames: int) -> dict[str, torch.Tensor]:
        """:meth:`inputs` of a cp rank's share of a video of ``frames`` sampled frames (``video``
        holds the share's frames, maybe none): pixels ``[n, 3, crop, crop]`` uint8 of the share
        only, ``video_num_frames [1]`` of the whole video."""
        return {**self.inputs(video, size), "video_num_frames": torch.tensor([frames])}

    def placeholder(self, ids: dict[str, int], options: VideoOptions) -> tuple[list[int], int, dict[str, torch.Tensor]]:
        """A skipped item: one ``<video>`` over one blank frame (``tokens_per_frame + 1`` tokens)."""
        return (
            [ids[VIDEO_TOKEN]],
            self.num_tokens(1, (self.crop, self.crop)),
            {
                "pixel_values_videos": torch.zeros(1, 3, self.crop, self.crop, dtype=torch.uint8),
                "video_num_frames": torch.tensor([1]),
            },
        )


def llava_video_format(
    model_config: dict[str, Any] | None,
    frame_size: int | None,
    patch_size: int | None,
    image_mean: Sequence[float],
    image_std: Sequence[float],
) -> LlavaVideoFormat:
    """The video format of the dataset components: the checkpoint's (``model_config``, its parsed
    ``config.json``, given by the recipe) or, without one, ``frame_size`` and ``patch_size``
    (default the 7B's 384 and 14). With a checkpoint, ``frame_size`` and ``patch_size`` are no
    longer needed: a value the checkpoint agrees with is only warned about.

    Raises:
        ValueError: a ``frame_size`` or ``patch_size`` that is not the checkpoint's (names the keys),
            or a checkpoint that is not LLaVA-OneVision's.
    """
    if model_config is None:
        return LlavaVideoFormat(
            LlavaVideoFormat.crop if frame_size is None else frame_size,
            LlavaVideoFormat.patch if patch_size is None else patch_size,
            tuple(image_mean),
            tuple(image_std),
        )
    video_format = LlavaVideoFormat.from_model_config(model_config, image_mean, image_std)
    for key, given, config_key, derived in (
        ("frame_size", frame_size, "image_size", video_format.crop),
        ("patch_size", patch_size, "patch_size", video_format.patch),
    ):
        if given is not None and given != derived:
            raise ValueError(
                f"dataset.{key} {given} is not the checkpoint's vision_config {config_key} {derived}: "
                f"remove dataset.{key} (the frames are sized from the checkpoint)"
            )
        if given is not None:
            logger.warning(
                "dataset.%s is no longer needed (the checkpoint's vision_config %s gives it): remove it",
                key,
                config_key,
            )
    return video_format


def llava_video_sft_dataset(
    tokenizer,
    data_files: PathLike | Sequence[PathLike],
    max_seq_len: int,
    data_root: PathLike | None = None,
    fps: float = 1.0,
    max_frames: int = 32,
    frame_size: int | None = None,
    patch_size: int | None = None,
    image_mean: Sequence[float] = SIGLIP_MEAN,
    image_std: Sequence[float] = SIGLIP_STD,
    skip_bad_samples: bool = False,
    packed: bool = False,
    model_config: dict[str, Any] | None = None,
    decode_device: str = "cpu",
    decode_threads: int = 1,
) -> VideoSFTDataset | PackedDataset:
    """Video SFT samples (the formats of :func:`omnilong.data.video_sft_dataset`) for
    LLaVA-OneVision; the config's ``dataset:`` component.

    Args:
        tokenizer: the model's tokenizer (given by the recipe), with ``<video>`` and ``<image>``.
        data_files: JSONL / JSON / parquet files, directories or globs.
        max_seq_len: most tokens per sample (given by the recipe).
        data_root: directory for relative video paths (default: each sample file's directory).
        fps, max_frames: frame sampling (``max_frames`` frames spread over a video longer than
            ``max_frames / fps`` seconds; LLaVA-OneVision's usual budget is 32).
        image_mean, image_std: the checkpoint's video processor's normalisation.
        frame_size, patch_size: the tower's ``image_size`` and ``patch_size``; not needed with
            ``model_config`` (see :func:`llava_video_format`).
        skip_bad_samples, packed: as :func:`omnilong.data.video_sft_dataset`'s.
        model_config: the checkpoint's parsed ``config.json`` (given by the recipe), that the
            frames are sized from.
        decode_device, decode_threads: as :func:`omnilong.data.video_sft_dataset`'s.
    """
    video_format = llava_video_format(model_config, frame_size, patch_size, image_mean, image_std)
    options = VideoOptions(fps=fps, max_frames=max_frames, decode_device=decode_device, decode_threads=decode_threads)
    source = ", ".join(map(str, expand_data_files(data_files)))
    dataset = VideoSFTDataset(
        tokenizer,
        read_video_samples(data_files, data_root, video_format.marker),
        max_seq_len,
        options,
        skip_bad_samples,
        source,
        video_format,
    )
    return packed_or_not(dataset, packed)
