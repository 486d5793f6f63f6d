"""Video input for Qwen2.5-VL: frames decoded at a fixed rate, turned into vision patches.

Processing reproduces transformers' ``Qwen2VLVideoProcessor`` bit for bit (see
``tests/data/test_video.py``): ``smart_resize`` to multiples of 28 within
``[min_pixels, max_pixels]``, bicubic antialiased resize of the uint8 frames, an odd
frame count padded by repeating the last frame, patches flattened so that every
2x2 merge group is 4 consecutive rows of ``3 * 2 * 14 * 14`` values, and rescale and CLIP
normalisation fused as ``(x - 255 * mean) / (255 * std)`` in fp32. The numbers are the
vision tower's (:class:`Patching`, from the checkpoint's ``vision_config``; Qwen2.5-VL's
14 px patches over 2 frames, 2x2 per LLM token, by default).

Patching is a permutation of the values, so it commutes with the per-channel normalisation:
training items carry the patches as uint8 (:func:`video_patches`, a quarter of the fp32
bytes in the loader's workers, pinned memory and the host-to-device copy) and the batch is
normalised once on the model's device (:func:`normalize_pixels`); the result is bitwise the
processor's, as elementwise fp32 subtraction and division are exactly rounded everywhere.
"""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DECODE_BATCH_FRAMES = 8  # full-size frames held at once while decoding (8 x 2.8 MB at 720p)


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


class FFmpegUnavailableError(RuntimeError):
    """torchcodec cannot load FFmpeg's shared libraries: no video or image can be decoded on
    this machine (not a fault of any one file, so never a skipped sample)."""


def torchcodec_decoders() -> ModuleType:
    """``torchcodec.decoders``, loaded on first use.

    Raises:
        FFmpegUnavailableError: FFmpeg's shared libraries are missing (names the fix, in one
            line, instead of torchcodec's page of loader tracebacks).
    """
    try:
        import torchcodec.decoders
    except RuntimeError as e:
        if "Could not load libtorchcodec" not in str(e):
            raise
        raise FFmpegUnavailableError(
            "video and image decoding needs FFmpeg's shared libraries (versions 4 to 9), which torchcodec "
            "could not load: install them (sudo apt-get install ffmpeg, or conda install -c conda-forge "
            "'ffmpeg<8'; scripts/setup.sh does when it can), check with `ffmpeg -version`; torchcodec's "
            "own report: python -c 'import torchcodec.decoders'"
        ) from None
    return torchcodec.decoders


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
        decode_device: ``"cpu"``, or ``"cuda"`` for NVIDIA's hardware decoder (see
            :class:`SampledVideo`; falls back to the CPU, with a warning, where unavailable).
        decode_threads: FFmpeg's decoding threads per open video on the CPU (each loader worker
            decodes one video at a time); the frames are the same at any count.
    """

    fps: float = 1.0
    max_frames: int = 768
    min_pixels: int = 128 * 28 * 28  # 128 LLM tokens of 28x28 px (Qwen2.5-VL's video processor)
    max_pixels: int = 768 * 28 * 28
    total_pixels: int | None = None
    decode_device: str = "cpu"
    decode_threads: int = 1

    def __post_init__(self):
        if self.decode_device not in ("cpu", "cuda"):
            raise ValueError(f"video decode_device must be 'cpu' or 'cuda', got {self.decode_device!r}")
        if isinstance(self.decode_threads, bool) or not isinstance(self.decode_threads, int) or self.decode_threads < 1:
            raise ValueError(
                f"video decode_threads must be an integer >= 1 (FFmpeg threads per loader worker), "
                f"got {self.decode_threads!r}"
            )
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


def _cuda_decoding_unavailable() -> str | None:
    """Why torchcodec cannot decode on NVIDIA's hardware decoder here, or ``None`` when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    from torchcodec.decoders import set_cuda_backend  # noqa: F401  (present only in torchcodec builds with CUDA)

    return None


def _open(path: Path, device: str = "cpu", threads: int = 1):
    """A torchcodec decoder of ``path`` on ``device`` (``threads``: FFmpeg's, on the CPU); corrupt
    input surfaces as VideoDecodeError."""
    decoders = torchcodec_decoders()
    try:
        return decoders.VideoDecoder(path, dimension_order="NCHW", num_ffmpeg_threads=threads, device=device)
    except (RuntimeError, ValueError) as e:  # torchcodec reports unreadable input as either
        raise VideoDecodeError(f"{path}: cannot decode video ({str(e).splitlines()[0][:200]})") from e


_warned_cuda_fallback = False


def _open_on(path: Path, device: str, threads: int = 1):
    """:func:`_open` on ``device``; ``"cuda"`` falls back to the CPU decoder (with one warning
    that says why) where NVIDIA decoding is unavailable: no CUDA device, or a torchcodec or
    FFmpeg build without it."""
    global _warned_cuda_fallback
    if device == "cpu":
        return _open(path, threads=threads)
    try:
        reason = _cuda_decoding_unavailable()
        if reason is None:
            return _open(path, device)
    except (ImportError, RuntimeError) as e:
        reason = f"torchcodec cannot decode on CUDA ({str(e).splitlines()[0][:200]})"
    if not _warned_cuda_fallback:
        logger.warning("video decode_device=%s unavailable: %s; decoding on the CPU instead", device, reason)
        _warned_cuda_fallback = True
    return _open(path, threads=threads)


class SampledVideo:
    """An open video and the times :func:`sample_timestamps` picks from it; the frame count and
    size come from the stream's metadata (headers and frame index: nothing is decoded until
    :meth:`decode`).

    Args:
        path: the video file.
        fps, max_frames: sampling (see :func:`decode_video`).
        decode_device: ``"cpu"`` or ``"cuda"`` (NVIDIA's hardware decoder, falling back to the
            CPU with a warning where unavailable; its pixels are not bitwise the CPU's).
        decode_threads: FFmpeg's decoding threads on the CPU (the same frames at any count).

    Attributes:
        num_frames: frames sampled (``T``); ``height``, ``width``: the stream's frame size;
        fps: the effective sampling rate.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        VideoDecodeError: the file is unreadable or corrupt, or has no decodable frame.
    """

    def __init__(
        self,
        path: str | Path,
        fps: float = 1.0,
        max_frames: int = 768,
        decode_device: str = "cpu",
        decode_threads: int = 1,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: video file not found")
        self._decoder = _open_on(self.path, decode_device, decode_threads)
        meta = self._decoder.metadata
        if not meta.num_frames:
            raise VideoDecodeError(f"{self.path}: video has no decodable frames")
        self.times, self.fps = sample_timestamps(meta.begin_stream_seconds, meta.end_stream_seconds, fps, max_frames)
        self.num_frames, self.height, self.width = len(self.times), meta.height, meta.width

    def decode(
        self,
        size: tuple[int, int] | None = None,
        indices: Sequence[int] | None = None,
        batch_frames: int = DECODE_BATCH_FRAMES,
    ) -> DecodedVideo:
        """Decode the sampled frames ``indices`` (default all, ``0 .. num_frames - 1``), each batch
        of ``batch_frames`` resized to ``size`` (bicubic, antialiased, uint8: :func:`resize_frames`,
        bit for bit the processors' resize) as soon as it is decoded, so that at most one batch
        of full-size frames is ever held.

        Returns:
            The frames ``[len(indices), 3, *size]`` uint8 (``size`` default the stream's) and the fps.

        Raises:
            VideoDecodeError: a frame cannot be decoded, or decoded frames of another size than
                the metadata's (names the file).
        """
        indices = range(self.num_frames) if indices is None else indices
        height, width = size if size is not None else (self.height, self.width)
        frames = torch.empty(len(indices), 3, height, width, dtype=torch.uint8)
        for start in range(0, len(indices), batch_frames):
            times = [self.times[i] for i in indices[start : start + batch_frames]]
            try:
                batch = self._decoder.get_frames_played_at(seconds=times).data  # shape: [b, 3, H, W]
            except RuntimeError as e:
                raise VideoDecodeError(f"{self.path}: cannot decode frames ({str(e).splitlines()[0][:200]})") from e
            if batch.shape[-2:] != (self.height, self.width):
                raise VideoDecodeError(
                    f"{self.path}: decoded frames of {tuple(batch.shape[-2:])}, "
                    f"but the metadata gives {(self.height, self.width)}"
                )
            frames[start : start + len(times)] = resize_frames(batch, height, width).cpu()
        return DecodedVideo(frames=frames, fps=self.fps)


def decode_video(
    path: str | Path,
    fps: float = 1.0,
    max_frames: int = 768,
    size: tuple[int, int] | None = None,
    indices: Sequence[int] | None = None,
) -> DecodedVideo:
    """Decode the frames of ``path`` shown at ``0, 1/fps, 2/fps, ...`` (from the stream's
    start, within its duration), spread more thinly when there would be over ``max_frames``;
    only the sampled frames ``indices`` (default all), each resized to ``size`` (default: kept)
    as it is decoded (:meth:`SampledVideo.decode`).

    Returns:
        The frames (``[T, 3, H, W]`` uint8; ``T = len(indices)`` with ``indices``) and their
        effective fps (the whole sampling's).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        VideoDecodeError: the file is unreadable or corrupt, or has no decodable frame.
    """
    return SampledVideo(path, fps, max_frames).decode(size, indices)


def probe_video(path: str | Path, fps: float = 1.0, max_frames: int = 768) -> tuple[int, int, int]:
    """``(frames, height, width)`` that :func:`decode_video` gives ``path``, from the stream's
    metadata alone (what torchcodec reads on opening: headers and frame index; no frame is
    decoded).

    Raises:
        FileNotFoundError, VideoDecodeError: as :func:`decode_video`.
    """
    video = SampledVideo(path, fps, max_frames)
    return video.num_frames, video.height, video.width


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


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[T, 3, H, W]`` uint8 -> ``[T, 3, height, width]`` uint8: transformers' processors'
    bicubic antialiased resize (the frames themselves when the size is already that)."""
    import torchvision.transforms.v2.functional as tvF  # here: importing torchvision costs ~1 s that text runs skip

    return tvF.resize(frames, [height, width], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)


def normalization_constants(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(255 * mean, 255 * std)`` ``[C]`` fp32, computed as transformers' processors fold the
    1/255 rescaling into the normalisation (bit for bit the same constants)."""
    scale = 1.0 / (1.0 / 255.0)
    return torch.tensor(mean) * scale, torch.tensor(std) * scale


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels -> fp32 ``(x - 255 * mean) / (255 * std)`` per channel, on ``pixels``' device.

    Args:
        pixels: ``[N, C, ...]`` (frames) or ``[N, C * k]`` (patch rows, channel-major: Qwen2.5-VL's
            ``[N, 3 * 2 * 14 * 14]``) uint8, ``C = len(mean)``.

    Returns:
        fp32 of ``pixels``' shape: bitwise what :func:`resize_and_normalize` (transformers'
        processors) gives the same values, on any device (one exactly rounded fp32 subtraction
        and division per value, by constants computed on the CPU).
    """
    mean, std = (c.to(pixels.device)[:, None] for c in normalization_constants(mean, std))  # shape: [C, 1]
    values = pixels.to(torch.float32)
    values.view(values.shape[0], len(mean), -1).sub_(mean).div_(std)
    return values


def resize_and_normalize(
    frames: torch.Tensor, height: int, width: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``[T, 3, H, W]`` uint8 -> ``[T, 3, height, width]`` fp32 as transformers' processors do it:
    :func:`resize_frames`, then rescaling by 1/255 and normalisation fused as
    ``(x - 255 * mean) / (255 * std)``."""
    import torchvision.transforms.v2.functional as tvF

    mean, std = normalization_constants(mean, std)
    return tvF.normalize(resize_frames(frames, height, width).to(torch.float32), mean, std, inplace=True)


def video_patches(
    video: DecodedVideo, height: int, width: int, patching: Patching = Patching(), chunk_frames: int = 16
) -> dict[str, torch.Tensor]:
    """The vision inputs of one video resized to ``height x width`` (multiples of 28), cut by
    ``patching``, its values kept uint8 (:func:`normalize_pixels` makes them the model's);
    ``chunk_frames`` frames are resized and patched at a time, straight into the output.

    Returns:
        ``pixel_values_videos`` ``[t * h * w, 1176]`` uint8, ``video_grid_thw`` ``[1, 3]``
        int64 ``(t, h, w)`` in patches, ``second_per_grid_ts`` ``[1]`` fp32
        (``2 / fps``, seconds per temporal patch).
    """
    count = video.frames.shape[0]
    grid = video_grid(count, height, width, patching)
    per_frame = grid[1] * grid[2] // patching.temporal  # patch rows per frame of a temporal patch
    padded = grid[0] * patching.temporal  # an odd count repeats the last frame
    chunk = max(patching.temporal, chunk_frames - chunk_frames % patching.temporal)
    pixels = torch.empty(grid[0] * grid[1] * grid[2], patching.patch_dim, dtype=torch.uint8)
    for start in range(0, padded, chunk):
        index = torch.arange(start, min(start + chunk, padded)).clamp(max=count - 1)
        frames = resize_frames(video.frames[index], height, width)
        pixels[start * per_frame : (start + len(index)) * per_frame] = patchify(frames, patching)
    return {
        "pixel_values_videos": pixels,  # shape: [t * h * w, 1176]
        "video_grid_thw": torch.tensor([grid]),
        "second_per_grid_ts": torch.tensor([patching.temporal / video.fps], dtype=torch.float32),
    }


def process_video(
    video: DecodedVideo, height: int, width: int, patching: Patching = Patching()
) -> dict[str, torch.Tensor]:
    """:func:`video_patches` with the pixels normalised as transformers' ``Qwen2VLVideoProcessor``
    does (``pixel_values_videos`` ``[t * h * w, 1176]`` fp32): the processor's output, bit for bit."""
    inputs = video_patches(video, height, width, patching)
    inputs["pixel_values_videos"] = normalize_pixels(inputs["pixel_values_videos"], CLIP_MEAN, CLIP_STD)
    return inputs
