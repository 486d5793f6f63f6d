"""Dataset components over prepared directories (``tools/prepare_data.py``), one or several
mixed by weight.

``sources`` in a config is a path, a list of paths (weight 1 each) or a list of
``{path: ..., weight: ...}``. Construction opens memory maps and reads ``meta.json``; rows
are sliced from the maps when asked for, so each rank touches only its own rows.
"""

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from omnilong.data.chat import ChatDataset, shifted_labels
from omnilong.data.llava_video import SIGLIP_MEAN, SIGLIP_STD, llava_video_format
from omnilong.data.mixing import WeightedMix
from omnilong.data.packed_text import PackedRows, row_pad_id, separator_id
from omnilong.data.packing import packed_or_not
from omnilong.data.prepared import PreparedSource, open_prepared
from omnilong.data.video import VideoOptions
from omnilong.data.video_sft import QwenVideoFormat, VideoSample, VideoSFTDataset

SourcesArg = str | Path | Sequence[str | Path | Mapping[str, Any]]


def parse_sources(sources: SourcesArg) -> list[tuple[Path, float]]:
    """``[(directory, weight)]`` of a ``sources`` argument.

    Raises:
        ValueError: an entry that is neither a path nor ``{path, weight > 0}`` (names it).
    """
    entries = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not entries:
        raise ValueError("dataset.sources is empty; give one or more prepared directories")
    parsed = []
    for i, entry in enumerate(entries):
        if isinstance(entry, (str, Path)):
            parsed.append((Path(entry), 1.0))
            continue
        weight = entry.get("weight", 1.0) if isinstance(entry, Mapping) else None
        if (
            not isinstance(entry, Mapping)
            or set(entry) - {"path", "weight"}
            or not isinstance(entry.get("path"), str)
            or isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or weight <= 0
        ):
            raise ValueError(
                f"dataset.sources[{i}] must be a path or {{path: <prepared dir>, weight: <number > 0>}}, got {entry!r}"
            )
        parsed.append((Path(entry["path"]), float(weight)))
    return parsed


# What a prepared source's meta.json says of its contents (not of how long preparing took).
_CONTENT_KEYS = (
    "format_version",
    "kind",
    "settings",
    "tokenizer_fingerprint",
    "sources",
    "num_documents",
    "num_tokens",
)


def _mix(datasets: list[Dataset], weights: list[float], sources: list[PreparedSource]) -> Dataset:
    """``datasets`` mixed by ``weights``. ``prepared_sources`` describes each source (what a
    checkpoint records of the data, to notice other data on resume): path, weight, documents,
    tokens and a fingerprint of its ``meta.json`` contents (tokenizer, settings, source files'
    sizes and times, counts)."""
    dataset = datasets[0] if len(datasets) == 1 else WeightedMix(datasets, weights)
    dataset.prepared_sources = [
        {
            "path": str(source.path),
            "weight": weight,
            "documents": source.num_documents,
            "tokens": int(source.meta["num_tokens"]),
            "fingerprint": hashlib.sha256(
                json.dumps({k: source.meta.get(k) for k in _CONTENT_KEYS}, sort_keys=True).encode()
            ).hexdigest()[:16],
        }
        for source, weight in zip(sources, weights)
    ]
    return dataset


def prepared_text_dataset(
    tokenizer, sources: SourcesArg, max_seq_len: int, separator_token: str | None = None
) -> Dataset:
    """Stage-1 packed rows (as :class:`~omnilong.data.PackedTextDataset`, row for row) from
    prepared ``text`` directories, mixed by weight (:class:`~omnilong.data.mixing.WeightedMix`).

    Args:
        tokenizer: the run's tokenizer; must be the one the sources were prepared with.
        sources: prepared directories, see the module docstring.
        max_seq_len: tokens per row.
        separator_token: must be the one the sources were prepared with (default: EOS).

    Raises:
        PreparedDataError: a source prepared with another tokenizer, kind or separator.
    """
    separator = separator_id(tokenizer, separator_token)
    datasets, weights, opened = [], [], []
    for path, weight in parse_sources(sources):
        source = open_prepared(path, "text", tokenizer, {"separator_id": separator})
        datasets.append(PackedRows(source.tokens, source.offsets, max_seq_len, row_pad_id(tokenizer, separator)))
        weights.append(weight)
        opened.append(source)
    return _mix(datasets, weights, opened)


class _ChatSamples(Sequence):
    """``(input_ids [T], labels [T])`` of the kept samples of a prepared chat source."""

    def __init__(self, source: PreparedSource, keep: np.ndarray):
        self.source, self.keep = source, keep

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = int(self.keep[index])
        lo, hi = int(self.source.offsets[d]), int(self.source.offsets[d + 1])
        input_ids = torch.from_numpy(np.asarray(self.source.tokens[lo:hi], dtype=np.int64))
        trainable = torch.from_numpy(np.asarray(self.source.trainable[lo:hi], dtype=np.bool_))
        return input_ids, shifted_labels(input_ids, trainable)


def _fitting(source: PreparedSource, max_seq_len: int, skip_bad_samples: bool) -> np.ndarray:
    """Indices of the documents of at most ``max_seq_len`` tokens.

    Raises:
        ValueError: a longer one (names it) unless ``skip_bad_samples``.
    """
    lengths = np.diff(source.offsets)
    too_long = np.flatnonzero(lengths > max_seq_len)
    if len(too_long) and not skip_bad_samples:
        first = int(too_long[0])
        raise ValueError(
            f"{source.record(first)['origin']}: sample has {int(lengths[first])} tokens, more than "
            f"max_seq_len={max_seq_len} (raise max_seq_len or set skip_bad_samples: true to skip "
            f"such samples; {len(too_long)} in {source.path})"
        )
    return np.flatnonzero(lengths <= max_seq_len)


def prepared_chat_dataset(
    tokenizer, sources: SourcesArg, max_seq_len: int, skip_bad_samples: bool = False, packed: bool = True
) -> Dataset:
    """Stage-2 chat samples (as :func:`~omnilong.data.chat_dataset`, sample for sample) from
    prepared ``chat`` directories, mixed by weight; ``packed``: each source's samples packed
    several to a row (:mod:`omnilong.data.packing`) before mixing, so weights apply to rows.

    Samples longer than ``max_seq_len`` are an error naming the first, or with
    ``skip_bad_samples`` left out and counted in ``num_skipped`` (with those the prepare
    step skipped).

    Raises:
        PreparedDataError: a source prepared with another tokenizer or kind.
        ValueError: a sample longer than ``max_seq_len``, unless skipped; no sample left.
    """
    datasets, weights, opened = [], [], []
    for path, weight in parse_sources(sources):
        source = open_prepared(path, "chat", tokenizer, {})
        opened.append(source)
        keep = _fitting(source, max_seq_len, skip_bad_samples)
        if not len(keep):
            raise ValueError(f"no chat sample of {source.path} fits max_seq_len={max_seq_len}")
        skipped = source.num_documents - len(keep) + source.meta["num_skipped"]["bad_samples"]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        lengths = np.diff(source.offsets)[keep]
        dataset = ChatDataset.from_tokenized(_ChatSamples(source, keep), lengths, max_seq_len, pad, skipped)
        datasets.append(packed_or_not(dataset, packed))
        weights.append(weight)
    return _mix(datasets, weights, opened)


class _VideoSamples(Sequence):
    """``(sample, input_ids [L], trainable [L])`` of a prepared video_sft source."""

    def __init__(self, source: PreparedSource):
        self.source = source

    def __len__(self) -> int:
        return self.source.num_documents

    def __getitem__(self, index: int) -> tuple[VideoSample, torch.Tensor, torch.Tensor]:
        lo, hi = int(self.source.offsets[index]), int(self.source.offsets[index + 1])
        record = self.source.record(index)
        sample = VideoSample(record["origin"], tuple(Path(v) for v in record["videos"]), record["messages"])
        input_ids = torch.from_numpy(np.asarray(self.source.tokens[lo:hi], dtype=np.int64))
        return sample, input_ids, torch.from_numpy(np.asarray(self.source.trainable[lo:hi], dtype=np.bool_))


def prepared_video_sft_dataset(
    tokenizer,
    sources: SourcesArg,
    max_seq_len: int,
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
) -> Dataset:
    """Stage-3 video samples (as :func:`~omnilong.data.video_sft_dataset`) from prepared
    ``video_sft`` directories, mixed by weight: construction neither reads the sample files
    nor tokenizes; videos are decoded per item, as before (a video gone since the prepare
    step is a bad sample then). ``packed`` as :func:`~omnilong.data.video_sft_dataset`'s
    (off by default; it reads every video's metadata at start-up), per source before mixing;
    ``model_config``, ``decode_device`` and ``decode_threads`` as :func:`~omnilong.data.video_sft_dataset`'s.

    Raises:
        PreparedDataError: a source prepared with another tokenizer or kind.
        ValueError: ``model_config`` is not a Qwen2.5-VL checkpoint's.
    """
    video_format = QwenVideoFormat() if model_config is None else QwenVideoFormat.from_model_config(model_config)
    options = VideoOptions(
        fps, max_frames, video_min_pixels, video_max_pixels, video_total_pixels, decode_device, decode_threads
    )
    return _prepared_videos(tokenizer, sources, max_seq_len, options, video_format, {}, skip_bad_samples, packed)


def prepared_llava_video_sft_dataset(
    tokenizer,
    sources: SourcesArg,
    max_seq_len: int,
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
) -> Dataset:
    """Stage-3 video samples for LLaVA-OneVision (as :func:`~omnilong.data.llava_video_sft_dataset`,
    sized from ``model_config`` the same way) from ``video_sft`` directories prepared with
    ``--video-format llava_onevision``, mixed by weight.

    Raises:
        PreparedDataError: a source prepared with another tokenizer, kind or video format.
        ValueError: see :func:`~omnilong.data.llava_video.llava_video_format`.
    """
    video_format = llava_video_format(model_config, frame_size, patch_size, image_mean, image_std)
    return _prepared_videos(
        tokenizer,
        sources,
        max_seq_len,
        VideoOptions(fps=fps, max_frames=max_frames, decode_device=decode_device, decode_threads=decode_threads),
        video_format,
        {"video_format": video_format.model_type},
        skip_bad_samples,
        packed,
    )


def _prepared_videos(
    tokenizer,
    sources: SourcesArg,
    max_seq_len: int,
    options: VideoOptions,
    video_format,
    settings: dict[str, Any],
    skip_bad_samples: bool,
    packed: bool,
) -> Dataset:
    """The video SFT datasets of prepared ``sources`` in ``video_format``, mixed by weight."""
    datasets, weights, opened = [], [], []
    for path, weight in parse_sources(sources):
        source = open_prepared(path, "video_sft", tokenizer, settings)
        opened.append(source)
        datasets.append(
            packed_or_not(
                VideoSFTDataset.from_tokenized(
                    tokenizer,
                    _VideoSamples(source),
                    max_seq_len,
                    options,
                    skip_bad_samples,
                    num_skipped=source.meta["num_skipped"]["bad_samples"],
                    video_format=video_format,
                ),
                packed,
            )
        )
        weights.append(weight)
    dataset = _mix(datasets, weights, opened)
    # the recipe checks these against the model's; every source uses this tokenizer
    dataset.video_token_id, dataset.image_token_id = datasets[0].video_token_id, datasets[0].image_token_id
    return dataset
