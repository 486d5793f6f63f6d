"""Video input for Qwen2.5-VL: frames decoded at a fixed rate, turned into vision patches.

Processing reproduces transformers' ``Qwen2VLVideoProcessor`` bit for bit (see
``tests/data/test_video.py``): ``smart_resize`` to multiples of 28 within
``[min_pixels, max_pixels]``, bicubic antialiased resize of the uint8 frames, rescale
and CLIP normalisation fused as ``(x - 255 * mean) / (255 * std)`` in fp32, an odd
frame count padded by repeating the last frame, and patches flattened so that every
2x2 merge group is 4 consecutive rows of ``3 * 2 * 14 * 14`` values. The numbers are the
vision tower's (:class:`Patching`, from the checkpoint's ``vision_config``; Qwen2.5-VL's
14 px patches over 2 frames, 2x2 per LLM token, by default).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Patching:
    """How a Qwen2.5-VL vision tower cuts frames: ``patch`` px square patches spanning ``temporal``
    frames, ``merge x merge`` neighbouring patches per LLM token (``vision_config``'s
    ``patch_size``, ``temporal_patch_size``, ``spatial_merge_size``)."""

    patch: int = 14
    temporal: int = 2
    merge: int = 2

    @classmethod
    def from_model_config(cls, config: dict[str, Any]) -> "Patching":
        """The patching of a parsed ``config.json`` (transformers' defaults for keys it leaves out)."""
        vision = config.get("vision_config") or {}
        return cls(
            vision.get("patch_size", cls.patch),
            vision.get("temporal_patch_size", cls.temporal),
            vision.get("spatial_merge_size", cls.merge),
        )

    @property
    def factor(self) -> int:
        """Side of the pixels behind one LLM token (28)."""
        return self.patch * self.merge

    @property
    def patch_dim(self) -> int:
        """Values of one patch row: ``3 * temporal * patch^2`` (1176)."""
        return 3 * self.temporal * self.patch * self.patch


class VideoDecodeError(ValueError):
    """A video file that cannot be decoded or holds no frame; the message names the file."""


@dataclass(frozen=True)
class VideoOptions:
    """How videos are sampled and sized.

    Args:
        fps: frames sampled per second of video.
        max_frames: most frames per video; longer videos are sampled uniformly over their
            duration with ``max_frames`` frames (a lower effective fps).
        min_pixels: least pixels per frame after resizing (transformers' ``shortest_edge``).
        max_pixels: most pixels per frame after resizing (transformers' ``longest_edge``).
        total_pixels: pixel budget of all the videos of a sample, counted per frame pair
            as qwen-vl-utils does: each frame is held to ``total_pixels * 2 // frames``
            pixels (but not below ``1.05 * min_pixels``), so a sample's videos take at most
            about ``total_pixels / 784`` LLM tokens. ``None``: no budget.
    """

    fps: float = 1.0
    max_frames: int = 768
    min_pixels: int = 128 * 28 * 28  # 128 LLM tokens of 28x28 px (Qwen2.5-VL's video processor)
    max_pixels: int = 768 * 28 * 28
    total_pixels: int | None = None

    def __post_init__(self):
        if self.fps <= 0 or self.max_frames < 1:
            raise ValueError(f"video fps must be positive and max_frames >= 1, got {self.fps} and {self.max_frames}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < video_min_pixels <= video_max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.total_pixels is not None and self.total_pixels <= 0:
            raise ValueError(f"video_total_pixels must be positive, got {self.total_pixels}")


@dataclass(frozen=True)
class DecodedVideo:
    """Frames sampled from one video.

    Attributes:
        frames: ``[T, 3, H, W]`` uint8 RGB; ``T`` may be odd (processing pads it).
        fps: effective frames per second of ``frames`` (the sampling rate, lower than
            asked when ``max_frames`` capped it).
    """

    frames: torch.Tensor
    fps: float


def sample_timestamps(begin: float, end: float, fps: float, max_frames: int) -> tuple[list[float], float]:
    """Sampling times of a stream shown from ``begin`` to ``end`` seconds.

    Returns:
        ``(times, rate)``: ``times = begin + k / rate`` for ``k = 0, 1, ...`` strictly
        before ``end`` (at least one), ``rate = min(fps, max_frames / duration)`` so that
        there are at most ``max_frames`` of them, evenly spread.
    """
    duration = end - begin
    rate = min(fps, max_frames / duration) if duration > 0 else fps
    count = min(max_frames, max(1, math.ceil(duration * rate)))
    return [begin + k / rate for k in range(count) if k == 0 or begin + k / rate < end], rate


def _open(path: Path):
    """A torchcodec decoder of ``path``; corrupt input surfaces as VideoDecodeError."""
    from torchcodec.decoders import VideoDecoder

    try:
        return VideoDecoder(path, dimension_order="NCHW")
    except (RuntimeError, ValueError) as e:  # torchcodec reports unreadable input as either
        raise VideoDecodeError(f"{path}: cannot decode video ({str(e).splitlines()[0][:200]})") from e


def _sampling_plan(path: Path, fps: float, max_frames: int):
    """``(decoder, times, rate)``: an open decoder of ``path`` and the :func:`sample_timestamps`
    of its stream, from its metadata."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: video file not found")
    decoder = _open(path)
    meta = decoder.metadata
    if not meta.num_frames:
        raise VideoDecodeError(f"{path}: video has no decodable frames")
    times, rate = sample_timestamps(meta.begin_stream_seconds, meta.end_stream_seconds, fps, max_frames)
    return decoder, times, rate


def decode_video(
    path: str | Path, fps: float = 1.0, max_frames: int = 768, indices: Sequence[int] | None = None
) -> DecodedVideo:
    """Decode the frames of ``path`` shown at ``0, 1/fps, 2/fps, ...`` (from the stream's
    start, within its duration), spread more thinly when there would be over ``max_frames``;
    with ``indices``, only those of them (positions in that sampling; none: no frame decoded).

    Returns:
        The frames (``[T, 3, H, W]`` uint8; ``T = len(indices)`` with ``indices``) and their
        effective fps (the whole sampling's).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        VideoDecodeError: the file is unreadable or corrupt, or has no decodable frame.
    """
    decoder, times, rate = _sampling_plan(Path(path), fps, max_frames)
    if indices is not None:
        times = [times[i] for i in indices]
    if not times:
        return DecodedVideo(torch.empty(0, 3, decoder.metadata.height, decoder.metadata.width, dtype=torch.uint8), rate)
    try:
        frames = decoder.get_frames_played_at(seconds=times).data  # shape: [T, 3, H, W]
    except RuntimeError as e:
        raise VideoDecodeError(f"{path}: cannot decode frames ({str(e).splitlines()[0][:200]})") from e
    return DecodedVideo(frames=frames, fps=rate)


def probe_video(path: str | Path, fps: float = 1.0, max_frames: int = 768) -> tuple[int, int, int]:
    """``(frames, height, width)`` that :func:`decode_video` gives ``path``, from the stream's
    metadata alone (what torchcodec reads on opening: headers and frame index; no frame is
    decoded).

    Raises:
        FileNotFoundError, VideoDecodeError: as :func:`decode_video`.
    """
    decoder, times, _ = _sampling_plan(Path(path), fps, max_frames)
    return len(times), decoder.metadata.height, decoder.metadata.width


def smart_resize(
    height: int, width: int, min_pixels: int, max_pixels: int, factor: int = Patching().factor
) -> tuple[int, int]:
    """``(height, width)`` rounded to multiples of ``factor``, scaled (keeping the aspect
    ratio) into ``[min_pixels, max_pixels]``; transformers' ``smart_resize``.

    Raises:
        ValueError: an aspect ratio above 200.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {height}x{width} frames is above 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def frame_max_pixels(options: VideoOptions, total_frames: int, patching: Patching = Patching()) -> int:
    """Most pixels per frame when ``total_frames`` frames share ``options.total_pixels``
    (transformers' ``cap_pixels_per_frame`` rule, qwen-vl-utils' ``VIDEO_TOTAL_PIXELS``)."""
    if options.total_pixels is None:
        return options.max_pixels
    share = options.total_pixels * patching.temporal // total_frames
    return max(min(options.max_pixels, share), int(options.min_pixels * 1.05))


def resized_sizes(
    videos: Sequence[DecodedVideo], options: VideoOptions, patching: Patching = Patching()
) -> list[tuple[int, int]]:
    """``(height, width)`` every video of one sample is resized to, the pixel budget shared
    by all their frames."""
    return shape_sizes([(v.frames.shape[0], *v.frames.shape[-2:]) for v in videos], options, patching)


def shape_sizes(
    shapes: Sequence[tuple[int, int, int]], options: VideoOptions, patching: Patching = Patching()
) -> list[tuple[int, int]]:
    """:func:`resized_sizes` of videos given as ``(frames, height, width)``."""
    max_pixels = frame_max_pixels(options, sum(frames for frames, _, _ in shapes), patching)
    return [smart_resize(h, w, options.min_pixels, max_pixels, patching.factor) for _, h, w in shapes]


def video_grid(num_frames: int, height: int, width: int, patching: Patching = Patching()) -> tuple[int, int, int]:
    """Patch grid ``(t, h, w)`` of ``num_frames`` frames resized to ``height x width``
    (an odd frame count is padded to even)."""
    return -(-num_frames // patching.temporal), height // patching.patch, width // patching.patch


def num_video_tokens(num_frames: int, height: int, width: int, patching: Patching = Patching()) -> int:
    """LLM tokens of a video: ``ceil(T / 2) * (H / 28) * (W / 28)``."""
    t, h, w = video_grid(num_frames, height, width, patching)
    return t * (h // patching.merge) * (w // patching.merge)


def patchify(frames: torch.Tensor, patching: Patching = Patching()) -> torch.Tensor:
    """``[T, C, H, W]`` (``T`` even, ``H`` and ``W`` multiples of 28) -> ``[N, C * 2 * 14 * 14]``.

    Rows run over temporal patches, then 2x2 merge groups in raster order, then the 4
    patches of a group in raster order; a row holds channel, time, row, column of its patch.
    """
    t, c, h, w = frames.shape
    p, tp, m = patching.patch, patching.temporal, patching.merge
    gt, gh, gw = t // tp, h // patching.factor, w // patching.factor
    x = frames.reshape(gt, tp, c, gh, m, p, gw, m, p)
    # -> [gt, gh, gw, merge_row, merge_col, c, time, patch_row, patch_col]
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * m * gw * m, c * tp * p * p)


def resize_and_normalize(
    frames: torch.Tensor, height: int, width: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``[T, 3, H, W]`` uint8 -> ``[T, 3, height, width]`` fp32 as transformers' processors do it:
    bicubic antialiased resize of the uint8 frames, then rescaling by 1/255 and normalisation
    fused as ``(x - 255 * mean) / (255 * std)``."""
    import torchvision.transforms.v2.functional as tvF  # here: importing torchvision costs ~1 s that text runs skip

    frames = tvF.resize(frames, [height, width], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    scale = 1.0 / (1.0 / 255.0)  # transformers folds rescaling into the normalisation this way
    return tvF.normalize(frames.to(torch.float32), torch.tensor(mean) * scale, torch.tensor(std) * scale, inplace=True)


def process_video(
    video: DecodedVideo, height: int, width: int, patching: Patching = Patching()
) -> dict[str, torch.Tensor]:
    """The vision inputs of one video resized to ``height x width`` (multiples of 28), cut by ``patching``.

    Returns:
        ``pixel_values_videos`` ``[t * h * w, 1176]`` fp32, ``video_grid_thw`` ``[1, 3]``
        int64 ``(t, h, w)`` in patches, ``second_per_grid_ts`` ``[1]`` fp32
        (``2 / fps``, seconds per temporal patch).
    """
    frames = resize_and_normalize(video.frames, height, width, CLIP_MEAN, CLIP_STD)
    if pad := -frames.shape[0] % patching.temporal:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    return {
        "pixel_values_videos": patchify(frames, patching),  # shape: [t * h * w, 1176]
        "video_grid_thw": torch.tensor([video_grid(frames.shape[0], height, width, patching)]),
        "second_per_grid_ts": torch.tensor([patching.temporal / video.fps], dtype=torch.float32),
    }
