"""Stage 3 data: video instruction tuning samples (Qwen2.5-VL's format here; LLaVA-OneVision's
in :mod:`omnilong.data.llava_video`, through the same dataset).

A sample is a JSONL line (or an element of a JSON list) in one of the common shapes::

    {"video": "clips/a.mp4", "conversations": [{"from": "human", "value": "<video>\\nWhat ...?"},
                                               {"from": "gpt", "value": "..."}]}
    {"video": "clips/a.mp4", "messages": [{"role": "user", "content": "<video>\\nWhat ...?"},
                                          {"role": "assistant", "content": "..."}]}

``video`` may also be a list, one per ``<video>`` placeholder (in user turns, in
order). Relative paths are resolved against ``data_root`` or else the sample file's
directory. Each placeholder becomes ``<|vision_start|>`` + ``<|video_pad|>`` x tokens +
``<|vision_end|>`` inside the chat template's rendering; labels are set only on
assistant turns and shifted once over the full sequence.

Positions are not part of an item: they are the model's rule, and the recipe computes
them on the full batch before any context-parallel cut, with the rule Qwen2.5-VL was
trained and is served with (``omnilong.models.qwen2_5_vl.rope_index``: the text after a
video resumes at the video's largest M-RoPE position + 1, as transformers 4.49-4.57,
vLLM and Qwen's own fine-tuning code do; not transformers >= 5.3's rule). An item
carries what they need: the token ids, ``video_grid_thw`` and ``second_per_grid_ts``.

How a video is written in the text, sized, counted in tokens and turned into tensors is
the model family's *video format* (:class:`QwenVideoFormat`, the default; the dataset is
otherwise the same for every family).

Construction reads and validates the sample files (and tokenizes the text); videos are
decoded in ``__getitem__``, so in the DataLoader's workers.

Bad samples and lockstep: a video that cannot be decoded, or a sample longer than
``max_seq_len`` once its videos are sized, raises :class:`BadSampleError` naming the
sample and file. With ``skip_bad_samples`` the item is instead a *placeholder* (Qwen's: a
three-token row holding one blank 2x28x28 video, one LLM token) with every label
ignored, flagged ``skipped = True``. It keeps the index -> item mapping (every rank
draws the same number of items, so the same number of steps), feeds the vision tower
like any other item (so every rank runs the same FSDP / context-parallel collectives)
and adds nothing to the loss or to the count of trained tokens. Samples whose video
file is missing at construction are dropped then (counted in ``num_skipped``); every
rank reads the same files, so all ranks see the same dataset length.

Context parallelism: after :meth:`VideoSFTDataset.decode_cp_share` (the recipe calls it with
the rank's place in its cp group), an item's token row is still the whole sample's, sized from
its videos' metadata, but only the frames this rank's vision tower share encodes are decoded,
resized and patched (:mod:`omnilong.vision_shares`, the rule the towers' splits use): about
``1/cp`` of the decode time, memory and host-to-device copy of a video per rank.

Packing (``packed`` of :func:`video_sft_dataset`) sizes each sample from its videos'
metadata at construction (:meth:`VideoSFTDataset.sample_lengths`) and puts several samples
in a row (:mod:`omnilong.data.packing`); a placeholder then takes its sample's place in
the row, so the rows, too, are the same on every rank.
"""

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from omnilong.data.chat import chat_content_form, shifted_labels, tokenize_conversation
from omnilong.data.packing import PackedDataset, packed_or_not
from omnilong.data.sources import PathLike, expand_data_files, read_records
from omnilong.data.video import (
    CLIP_MEAN,
    CLIP_STD,
    DecodedVideo,
    Patching,
    SampledVideo,
    VideoDecodeError,
    VideoOptions,
    normalize_pixels,
    num_video_tokens,
    probe_video,
    process_video,
    shape_sizes,
    video_grid,
    video_patches,
)
from omnilong.vision_shares import frame_share, unit_share

logger = logging.getLogger(__name__)

VIDEO_PLACEHOLDER = "<video>"
VISION_START, VISION_END, VIDEO_PAD, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadSampleError(ValueError):
    """A sample that cannot be used (undecodable video, too many tokens); names sample and file."""


@dataclass(frozen=True)
class VideoSample:
    """One validated sample.

    Attributes:
        origin: ``"file:line"`` (JSONL) or ``"file[index]"`` (JSON), for messages.
        videos: resolved video paths, in placeholder order.
        messages: ``[{"role", "content"}]`` with each ``<video>`` replaced by
            ``<|vision_start|><|video_pad|><|vision_end|>`` (one pad token per video).
    """

    origin: str
    videos: tuple[Path, ...]
    messages: list[dict]


def _messages(origin: str, record: dict) -> list[dict]:
    """``[{"role", "content"}]`` of the ShareGPT (``conversations``) or ``messages`` shape."""
    if isinstance(record.get("conversations"), list):
        turns, role_key, text_key = record["conversations"], "from", "value"
    elif isinstance(record.get("messages"), list):
        turns, role_key, text_key = record["messages"], "role", "content"
    else:
        raise ValueError(f"{origin}: expected a list 'conversations' (from/value) or 'messages' (role/content)")
    messages = []
    for i, turn in enumerate(turns):
        role = _ROLES.get(turn.get(role_key)) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get(text_key), str):
            raise ValueError(
                f"{origin}: turn {i} must be {{{role_key!r}: one of {sorted(_ROLES)}, "
                f"{text_key!r}: str}}, got {turn!r:.200}"
            )
        messages.append({"role": role, "content": turn[text_key]})
    if not messages:
        raise ValueError(f"{origin}: the conversation is empty")
    return messages


def parse_sample(
    origin: str, record: Any, root: Path, marker: str = VISION_START + VIDEO_PAD + VISION_END
) -> VideoSample:
    """Validate one raw sample, resolve its video paths against ``root`` and write each
    ``<video>`` placeholder as ``marker`` (the family's video format's).

    Raises:
        ValueError: a malformed sample, a ``<video>`` placeholder outside user turns, or
            placeholders and videos that do not pair up (names the sample).
    """
    if not isinstance(record, dict):
        raise ValueError(f"{origin}: expected an object, got {type(record).__name__}")
    videos = record.get("video")
    videos = [videos] if isinstance(videos, str) else videos
    if not isinstance(videos, list) or not videos or not all(isinstance(v, str) and v for v in videos):
        raise ValueError(f"{origin}: expected 'video': a path or a non-empty list of paths")
    messages = _messages(origin, record)
    if any(VIDEO_PLACEHOLDER in m["content"] for m in messages if m["role"] != "user"):
        raise ValueError(f"{origin}: a {VIDEO_PLACEHOLDER} placeholder may only appear in user turns")
    found = sum(m["content"].count(VIDEO_PLACEHOLDER) for m in messages)
    if found != len(videos):
        problem = "no" if found == 0 else ("more" if found > len(videos) else "fewer")
        raise ValueError(
            f"{origin}: {problem} {VIDEO_PLACEHOLDER} placeholders than videos "
            f"({found} placeholders, {len(videos)} videos)"
        )
    for m in messages:
        m["content"] = m["content"].replace(VIDEO_PLACEHOLDER, marker)
    return VideoSample(origin, tuple(root / v for v in videos), messages)


def read_video_samples(
    data_files: PathLike | Sequence[PathLike],
    data_root: PathLike | None = None,
    marker: str = VISION_START + VIDEO_PAD + VISION_END,
) -> Iterable[VideoSample]:
    """Validated samples of JSONL / JSON / parquet files (paths, directories or globs).

    Args:
        data_files: sample files.
        data_root: directory relative video paths are resolved against; default each
            sample file's directory.
        marker: what each ``<video>`` placeholder is written as (see :func:`parse_sample`).
    """
    for path in expand_data_files(data_files):
        root = Path(data_root).expanduser() if data_root is not None else path.parent
        for origin, record in read_records(path):
            yield parse_sample(origin, record, root, marker)


def tokenize_video_sample(
    tokenizer, sample: VideoSample, pad_token: str = VIDEO_PAD
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids [L]`` with one ``pad_token`` per video and ``trainable [L]`` (bool: the
    token belongs to an assistant turn).

    Raises:
        ValueError: the rendering does not hold one ``pad_token`` per video, or the chat
            template drops a message's text (names the sample).
    """
    try:
        input_ids, trainable = tokenize_conversation(tokenizer, sample.messages)
    except ValueError as e:
        raise ValueError(f"{sample.origin}: {e}") from None
    if int((input_ids == tokenizer.convert_tokens_to_ids(pad_token)).sum()) != len(sample.videos):
        raise ValueError(
            f"{sample.origin}: the rendered conversation does not hold one {pad_token} per video "
            f"(the text contains {pad_token}, or the chat template dropped a placeholder)"
        )
    return input_ids, trainable


def check_model_type(video_format, model_config: dict[str, Any]) -> None:
    """Raise ``ValueError`` when the checkpoint of ``model_config`` (its parsed ``config.json``) is
    not of the family ``video_format`` makes inputs for (names the dataset component to use)."""
    model_type = model_config.get("model_type")
    if model_type != video_format.model_type:
        raise ValueError(
            f"the dataset makes {video_format.model_type} video inputs, but the checkpoint is "
            f"{model_type}: use its dataset component (omnilong.data.video_sft_dataset for "
            "qwen2_5_vl, omnilong.data.llava_video_sft_dataset for llava_onevision)"
        )


@dataclass(frozen=True)
class QwenVideoFormat:
    """Qwen2.5-VL's video format: ``<|vision_start|>`` + ``<|video_pad|>`` x tokens +
    ``<|vision_end|>``; frames smart-resized to multiples of 28 (:mod:`omnilong.data.video`),
    one token per 2x2 patches of a frame pair; items carry ``pixel_values_videos [N, 1176]``
    uint8 (normalised on the model's device: :meth:`normalize`), ``video_grid_thw`` and
    ``second_per_grid_ts``.

    Args:
        patching: the vision tower's (:meth:`from_model_config`: the checkpoint's).
    """

    patching: Patching = Patching()

    model_type = "qwen2_5_vl"
    marker = VISION_START + VIDEO_PAD + VISION_END
    pad_token, image_token = VIDEO_PAD, IMAGE_PAD
    required_tokens = (VISION_START, VISION_END, VIDEO_PAD, IMAGE_PAD)

    @classmethod
    def from_model_config(cls, config: dict[str, Any]) -> "QwenVideoFormat":
        """The format of the checkpoint with the parsed ``config.json`` ``config``.

        Raises:
            ValueError: not a Qwen2.5-VL checkpoint (:func:`check_model_type`).
        """
        check_model_type(cls, config)
        return cls(Patching.from_model_config(config))

    def sizes(self, shapes: list[tuple[int, int, int]], options: VideoOptions) -> list[tuple[int, int]]:
        """``(height, width)`` each video of ``(frames, height, width)`` is resized to."""
        return shape_sizes(shapes, options, self.patching)

    def num_tokens(self, frames: int, size: tuple[int, int]) -> int:
        return num_video_tokens(frames, *size, self.patching)

    def inputs(self, video, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The item's vision inputs (:func:`~omnilong.data.video.video_patches`): uint8 patches,
        normalised on the model's device (:meth:`normalize`)."""
        return video_patches(video, *size, self.patching)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 patch rows ``[N, 1176]`` -> fp32, normalised as the video processor does (bit for bit)."""
        return normalize_pixels(pixels, CLIP_MEAN, CLIP_STD)

    def process(self, video, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """:meth:`inputs` normalised: the video processor's output."""
        return process_video(video, *size, self.patching)

    @property
    def temporal(self) -> int:
        """Frames per unit the vision tower encodes on its own (a frame pair)."""
        return self.patching.temporal

    def process_share(self, video, size: tuple[int, int], frames: int) -> dict[str, torch.Tensor]:
        """The vision inputs of a cp rank's share of a video of ``frames`` sampled frames:
        ``video`` holds the share's frames (whole frame pairs, maybe none; the last pair of an
        odd count completed as :func:`process_video` does). Pixels ``[n, 1176]`` uint8 of the
        share's pairs only, ``video_grid_thw`` and ``second_per_grid_ts`` of the whole video."""
        grid = torch.tensor([video_grid(frames, *size, self.patching)])
        if video.frames.shape[0] == 0:
            return {
                "pixel_values_videos": torch.zeros(0, self.patching.patch_dim, dtype=torch.uint8),
                "video_grid_thw": grid,
                "second_per_grid_ts": torch.tensor([self.patching.temporal / video.fps], dtype=torch.float32),
            }
        return {**self.inputs(video, size), "video_grid_thw": grid}

    def placeholder(self, ids: dict[str, int], options: VideoOptions) -> tuple[list[int], int, dict[str, torch.Tensor]]:
        """``(input_ids, video tokens, vision inputs)`` of a skipped item: one blank 2x28x28
        video (one LLM token) between ``<|vision_start|>`` and ``<|vision_end|>``."""
        merge = self.patching.merge
        grid = torch.tensor([[1, merge, merge]])
        return (
            [ids[VISION_START], ids[VIDEO_PAD], ids[VISION_END]],
            1,
            {
                "pixel_values_videos": torch.zeros(int(grid.prod()), self.patching.patch_dim, dtype=torch.uint8),
                "video_grid_thw": grid,
                "second_per_grid_ts": torch.tensor([self.patching.temporal / options.fps], dtype=torch.float32),
            },
        )


class VideoSFTDataset(Dataset):
    """Video chat samples; text tokenized at construction, videos decoded per item.

    Args:
        tokenizer: a transformers fast tokenizer with a chat template and the video
            format's tokens (Qwen's: ``<|vision_start|>``, ``<|vision_end|>``, ``<|video_pad|>``).
        samples: validated samples (:func:`read_video_samples` with the format's marker).
        max_seq_len: most tokens per sample, video tokens included.
        options: frame sampling and sizing.
        skip_bad_samples: drop samples whose video is missing (counted in
            ``num_skipped``) and turn unusable items into skipped placeholders instead
            of raising (see the module docstring).
        source: what the samples were read from (e.g. the file names), for errors.
        video_format: the model family's (default :class:`QwenVideoFormat`).

    Raises:
        ValueError: no usable sample, a tokenizer without the vision tokens or a chat
            template, or a placeholder the template did not keep.
        FileNotFoundError: a missing video (names sample and file), unless skipped.
    """

    def __init__(
        self,
        tokenizer,
        samples: Iterable[VideoSample],
        max_seq_len: int,
        options: VideoOptions = VideoOptions(),
        skip_bad_samples: bool = False,
        source: str = "the dataset",
        video_format=None,
    ):
        self._configure(tokenizer, max_seq_len, options, skip_bad_samples, video_format)
        self._samples: list[tuple[VideoSample, torch.Tensor, torch.Tensor]] = []
        for sample in samples:
            absent = next((v for v in sample.videos if not v.is_file()), None)
            if absent is not None:
                if not skip_bad_samples:
                    raise FileNotFoundError(f"{sample.origin}: video file not found: {absent}")
                self.num_skipped += 1
                continue
            self._samples.append((sample, *tokenize_video_sample(tokenizer, sample, self.format.pad_token)))
        if not self._samples:
            skipped = f" ({self.num_skipped} with a missing video skipped)" if self.num_skipped else ""
            raise ValueError(f"no usable video sample in {source}{skipped}")
        if self.num_skipped:
            logger.warning("skipped %d samples whose video file is missing", self.num_skipped)

    def _configure(
        self, tokenizer, max_seq_len: int, options: VideoOptions, skip_bad_samples: bool, video_format=None
    ) -> None:
        """Check the tokenizer and keep the settings and special token ids."""
        self.format = video_format if video_format is not None else QwenVideoFormat()
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        chat_content_form(tokenizer)  # refuses a tokenizer without a usable chat template
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in self.format.required_tokens}
        missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"the tokenizer lacks the vision tokens {missing}; use the checkpoint's tokenizer")
        self._token_ids = ids
        self.video_token_id, self.image_token_id = ids[self.format.pad_token], ids[self.format.image_token]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.max_seq_len, self.options = max_seq_len, options
        self.skip_bad_samples = skip_bad_samples
        self.num_skipped = 0
        self._lengths: list[int] | None = None  # set by sample_lengths(); items are held to them
        self.cp_rank, self.cp_size = 0, 1  # set by decode_cp_share()

    @classmethod
    def from_tokenized(
        cls,
        tokenizer,
        samples: Sequence[tuple[VideoSample, torch.Tensor, torch.Tensor]],
        max_seq_len: int,
        options: VideoOptions = VideoOptions(),
        skip_bad_samples: bool = False,
        num_skipped: int = 0,
        video_format=None,
    ) -> "VideoSFTDataset":
        """A dataset over samples validated and tokenized beforehand, ``(sample, input_ids [L],
        trainable [L])`` each (one ``<|video_pad|>`` per video), e.g. the lazy view of a prepared
        directory (:func:`omnilong.data.prepared_video_sft_dataset`); ``num_skipped`` counts the
        samples left out of ``samples``."""
        dataset = cls.__new__(cls)
        dataset._configure(tokenizer, max_seq_len, options, skip_bad_samples, video_format)
        dataset.num_skipped, dataset._samples = num_skipped, samples
        return dataset

    def __len__(self) -> int:
        return len(self._samples)

    def decode_cp_share(self, rank: int, cp: int) -> None:
        """From now on make items for cp rank ``rank`` of ``cp`` (the recipe calls this before its
        loader starts): each item's token row is the whole sample's (its layout comes from the
        videos' metadata, the same on every rank), its pixels only those of the frame units this
        rank's vision tower encodes (:func:`~omnilong.vision_shares.unit_share`, the rule the
        towers' splits use), and it carries ``decode_failures`` (see :meth:`__getitem__`).

        Raises:
            ValueError: ``rank`` outside ``0..cp-1``.
        """
        if not 0 <= rank < cp:
            raise ValueError(f"cp rank {rank} is outside 0..{cp - 1}")
        self.cp_rank, self.cp_size = rank, cp

    def normalize_pixels(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` (a collated batch of items, or this rank's cp shard of one, on the model's
        device) with its uint8 ``pixel_values_videos`` normalised as the family's video processor
        does (:meth:`QwenVideoFormat.normalize`): the model's fp32 pixels, bitwise the processor's.
        The recipe calls it after copying the batch to the device, so the loader's workers, pinned
        memory and the copy hold a quarter of the fp32 bytes."""
        pixels = batch.get("pixel_values_videos")
        if pixels is None:
            return batch
        return {**batch, "pixel_values_videos": self.format.normalize(pixels)}

    def sample_name(self, index: int) -> str:
        """``"origin (video, ...)"`` of sample ``index``, for messages."""
        sample = self._samples[index][0]
        return f"{sample.origin} ({', '.join(map(str, sample.videos))})"

    def sample_lengths(self) -> list[int]:
        """Tokens of each sample, video tokens included, from its videos' metadata (no frame
        is decoded; see :func:`~omnilong.data.video.probe_video`), for packing. From then on
        an item must have exactly that many tokens: one whose decoded frames disagree with the
        metadata is a bad sample. A sample that is bad already here (an unreadable video, too
        many tokens) raises :class:`BadSampleError`, or with ``skip_bad_samples`` counts as
        the 3 tokens of its placeholder.
        """
        if self._lengths is None:
            self._lengths = [self._probed_length(sample, input_ids) for sample, input_ids, _ in self._samples]
        return self._lengths

    def _probed_length(self, sample: VideoSample, input_ids: torch.Tensor) -> int:
        try:
            shapes = [probe_video(path, self.options.fps, self.options.max_frames) for path in sample.videos]
            return self._checked_length(sample, input_ids, shapes)[1]
        except (FileNotFoundError, VideoDecodeError, BadSampleError) as e:
            bad = e if isinstance(e, BadSampleError) else BadSampleError(f"{sample.origin}: {e}")
            if not self.skip_bad_samples:
                raise bad from e
            logger.warning("a bad sample will be skipped: %s", bad)
            return len(self._placeholder()["input_ids"])

    def _checked_length(
        self, sample: VideoSample, input_ids: torch.Tensor, shapes: list[tuple[int, int, int]]
    ) -> tuple[list[tuple[int, int]], int, list[int]]:
        """``(sizes, length, counts)`` of ``sample`` with videos of ``(frames, height, width)``:
        the size each is resized to, the sample's tokens and each video's tokens.

        Raises:
            BadSampleError: more than ``max_seq_len`` tokens.
        """
        sizes = self.format.sizes(shapes, self.options)
        counts = [self.format.num_tokens(frames, size) for (frames, _, _), size in zip(shapes, sizes)]
        length = len(input_ids) - len(shapes) + sum(counts)
        if length > self.max_seq_len:
            raise BadSampleError(
                f"{sample.origin}: sample has {length} tokens ({sum(counts)} of them video, from "
                f"{', '.join(map(str, sample.videos))}), more than max_seq_len={self.max_seq_len} (lower fps, "
                "max_frames or video_total_pixels, raise max_seq_len, or set skip_bad_samples: true)"
            )
        return sizes, length, counts

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Sample ``index`` with its videos decoded and processed.

        Returns:
            ``input_ids``, ``labels``, ``document_ids`` ``[T]``; ``pixel_values_videos`` ``[N, 1176]``
            uint8 (:meth:`normalize_pixels` makes them the model's); ``video_grid_thw`` ``[V, 3]``;
            ``second_per_grid_ts`` ``[V]``; ``skipped`` (0-d bool). After :meth:`decode_cp_share`,
            ``pixel_values_videos`` holds only this cp rank's frame units of each video, and
            ``decode_failures [T]`` is ``index + 1`` on every token when a video's frames of this
            rank's share could not be decoded (its pixels are then those of blank frames), else 0:
            a rank that decodes only part of a video cannot tell alone whether the sample is bad,
            so the recipe agrees over the cp group (``agree_on_decode_failures`` of
            :mod:`omnilong.parallel.context_parallel`) before it skips or refuses the sample on
            every rank alike. A video whose metadata cannot be read is bad on every rank alike:
            it raises (or gives the placeholder) as without cp.

        Raises:
            BadSampleError: an undecodable video or too many tokens, unless skipped.
        """
        try:
            return self._item(index)
        except BadSampleError as e:
            if not self.skip_bad_samples:
                raise
            logger.warning("skipping a bad sample: %s", e)
            return self._placeholder()

    def _item(self, index: int) -> dict[str, torch.Tensor]:
        sample, input_ids, trainable = self._samples[index]
        options = self.options
        try:  # the metadata, on every cp rank alike: an unreadable file is bad everywhere
            sources = [
                SampledVideo(path, options.fps, options.max_frames, options.decode_device, options.decode_threads)
                for path in sample.videos
            ]
        except (FileNotFoundError, VideoDecodeError) as e:
            raise BadSampleError(f"{sample.origin}: {e}") from e
        shapes = [(v.num_frames, v.height, v.width) for v in sources]
        sizes, length, counts = self._checked_length(sample, input_ids, shapes)
        if self._lengths is not None and length != self._lengths[index]:
            raise BadSampleError(
                f"{sample.origin}: sample has {length} tokens once decoded, but its videos' "
                f"metadata gave {self._lengths[index]} (what packing planned its row with)"
            )
        if self.cp_size > 1:
            vision, failed = self._shares(sample, sources, sizes)
        else:
            try:
                videos = [source.decode(size) for source, size in zip(sources, sizes)]  # resized as decoded
            except VideoDecodeError as e:
                raise BadSampleError(f"{sample.origin}: {e}") from e
            vision, failed = [self.format.inputs(v, size) for v, size in zip(videos, sizes)], False
        return self._row(
            input_ids,
            trainable,
            counts,
            {
                key: torch.cat([item[key] for item in vision]) if len(vision) > 1 else vision[0][key]
                for key in vision[0]
            },
            skipped=False,
            failure=index + 1 if failed else 0,
        )

    def _shares(
        self, sample: VideoSample, sources: list[SampledVideo], sizes: list[tuple[int, int]]
    ) -> tuple[list[dict[str, torch.Tensor]], bool]:
        """This cp rank's vision inputs of each video of ``sample`` (opened ``sources``, resized
        to ``sizes``): only its share's frames decoded (resized as decoded) and processed. Returns
        them and whether a share could not be decoded here: its pixels are then those of blank
        frames and its ``second_per_grid_ts`` that of the asked fps (the sample is dropped on every
        rank, and only its own tokens, whose labels are then ignored, see its pixels and positions)."""
        vision, failed = [], False
        for source, size in zip(sources, sizes):
            lo, hi = frame_share(source.num_frames, self.format.temporal, self.cp_rank, self.cp_size)
            try:
                video = source.decode(size, range(lo, hi))
            except VideoDecodeError as e:
                # an error, so that every rank logs it: the other ranks know only that this one failed
                logger.error("%s: cp rank %d cannot decode its frames of a video: %s", sample.origin, self.cp_rank, e)
                failed = True
                video = DecodedVideo(torch.zeros(hi - lo, 3, *size, dtype=torch.uint8), self.options.fps)
            vision.append(self.format.process_share(video, size, source.num_frames))
        return vision, failed

    def _row(
        self,
        input_ids: torch.Tensor,
        trainable: torch.Tensor,
        counts: list[int],
        vision: dict[str, torch.Tensor],
        skipped: bool,
        failure: int = 0,
    ) -> dict[str, torch.Tensor]:
        """The item of a token row holding one ``<|video_pad|>`` per video, each expanded
        to ``counts[i]`` tokens; labels shifted once over the full row; with a cp share,
        ``decode_failures`` ``failure`` on every token."""
        repeats = torch.ones_like(input_ids)
        repeats[input_ids == self.video_token_id] = torch.tensor(counts)
        input_ids, trainable = input_ids.repeat_interleave(repeats), trainable.repeat_interleave(repeats)
        shared = {"decode_failures": torch.full_like(input_ids, failure)} if self.cp_size > 1 else {}
        return {
            "input_ids": input_ids,
            "labels": shifted_labels(input_ids, trainable),
            "document_ids": torch.zeros(len(input_ids), dtype=torch.long),
            **vision,
            "skipped": torch.tensor(skipped),
            **shared,
        }

    def _placeholder(self) -> dict[str, torch.Tensor]:
        """A skipped item: the format's placeholder over one blank video (Qwen's:
        ``<|vision_start|><|video_pad|><|vision_end|>``, one LLM token), no label trained."""
        input_ids, count, vision = self.format.placeholder(self._token_ids, self.options)
        lo, hi = unit_share(1, self.cp_rank, self.cp_size)  # the blank video is one unit
        pixels = vision["pixel_values_videos"]
        vision["pixel_values_videos"] = pixels[: pixels.shape[0] * (hi - lo)]
        return self._row(
            torch.tensor(input_ids), torch.zeros(len(input_ids), dtype=torch.bool), [count], vision, skipped=True
        )


def video_sft_dataset(
    tokenizer,
    data_files: PathLike | Sequence[PathLike],
    max_seq_len: int,
    data_root: PathLike | None = None,
    fps: float = 1.0,
    max_frames: int = 768,
    video_min_pixels: int = VideoOptions.min_pixels,
    video_max_pixels: int = VideoOptions.max_pixels,
    video_total_pixels: int | None = None,
    skip_bad_samples: bool = False,
    packed: bool = False,
    model_config: dict[str, Any] | None = None,
    decode_device: str = "cpu",
    decode_threads: int = 1,
) -> VideoSFTDataset | PackedDataset:
    """:class:`VideoSFTDataset` over sample files; the config's ``dataset:`` component.

    Args:
        tokenizer: the model's tokenizer (given by the recipe).
        data_files: JSONL / JSON / parquet files, directories or globs.
        max_seq_len: most tokens per sample (given by the recipe).
        data_root: directory for relative video paths (default: each sample file's directory).
        fps, max_frames, video_min_pixels, video_max_pixels, video_total_pixels: see
            :class:`~omnilong.data.video.VideoOptions`.
        skip_bad_samples: see :class:`VideoSFTDataset`.
        packed: several samples per row (:mod:`omnilong.data.packing`), packed by the token
            counts the videos' metadata gives (:meth:`VideoSFTDataset.sample_lengths`: every
            video is opened once at construction); else one sample per row.
        model_config: the checkpoint's parsed ``config.json`` (given by the recipe): the
            frames are cut as its vision tower cuts them (:meth:`QwenVideoFormat.from_model_config`);
            ``None``: Qwen2.5-VL's patching.
        decode_device: ``"cpu"``, or ``"cuda"``: NVIDIA's hardware decoder, where available (else
            the CPU, with a warning saying why; see :class:`~omnilong.data.video.SampledVideo`).
        decode_threads: FFmpeg's decoding threads per loader worker on the CPU (default 1; the
            same frames at any count): more to keep an hour-long video's loader ahead of the step
            where the node has cores to spare (docs/benchmarks.md, Stage-3 video sample).

    Raises:
        ValueError: ``model_config`` is not a Qwen2.5-VL checkpoint's (names the component to use).
    """
    video_format = QwenVideoFormat() if model_config is None else QwenVideoFormat.from_model_config(model_config)
    options = VideoOptions(
        fps, max_frames, video_min_pixels, video_max_pixels, video_total_pixels, decode_device, decode_threads
    )
    source = ", ".join(map(str, expand_data_files(data_files)))
    dataset = VideoSFTDataset(
        tokenizer,
        read_video_samples(data_files, data_root),
        max_seq_len,
        options,
        skip_bad_samples,
        source,
        video_format,
    )
    return packed_or_not(dataset, packed)
