"""Batching rows of different lengths."""

import torch

from omnilong.constants import IGNORE_INDEX

#: Per-sample vision tensors, concatenated over the batch along dim 0 (their rows are
#: matched to pad tokens in order, row-major over the batch).
VISION_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "video_num_frames")


def collate_padded(samples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack samples into ``[B, T]`` tensors, right-padding to the longest.

    Padding gets ``pad_id`` tokens, ``-100`` labels, positions continuing the sample's
    (each M-RoPE stream from its last value), document id -1 (a document of its own,
    so real tokens never attend to it) and ``decode_failures`` 0 (a cp share's items).
    ``position_ids`` of shape ``[3, T]`` become ``[3, B, T]``. Vision tensors (:data:`VISION_KEYS`) are concatenated along dim 0;
    0-d values (a video item's ``skipped`` flag, a packed row's count of skipped samples)
    are stacked into ``[B]``.
    """
    length = max(s["input_ids"].shape[-1] for s in samples)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "document_ids": -1, "decode_failures": 0}
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in VISION_KEYS:
            batch[key] = torch.cat(values)
        elif values[0].dim() == 0:
            batch[key] = torch.stack(values)
        else:
            batch[key] = torch.stack([_pad_row(key, v, length, fill) for v in values], dim=values[0].dim() - 1)
    return batch


def _pad_row(key: str, row: torch.Tensor, length: int, fill: dict[str, int]) -> torch.Tensor:
    """``row`` (``[T]``, or ``[3, T]`` for M-RoPE positions) right-padded to ``length``."""
    pad = length - row.shape[-1]
    if key == "position_ids":
        extra = row[..., -1:] + 1 + torch.arange(pad)
    else:
        extra = torch.full((pad,), fill[key], dtype=row.dtype)
    return torch.cat([row, extra], dim=-1)
