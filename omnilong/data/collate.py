"""Batching rows of different lengths."""

import torch

from omnilong.data.packed_text import IGNORE_INDEX


def collate_padded(samples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack samples into ``[B, T]`` tensors, right-padding to the longest.

    Padding gets ``pad_id`` tokens, ``-100`` labels, positions continuing the sample's,
    and document id -1 (a document of its own, so real tokens never attend to it).
    """
    length = max(s["input_ids"].shape[-1] for s in samples)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "document_ids": -1}
    batch = {}
    for key in samples[0]:
        rows = []
        for s in samples:
            pad = length - s[key].shape[-1]
            if key == "position_ids":
                extra = s[key][-1] + 1 + torch.arange(pad)
            else:
                extra = torch.full((pad,), fill[key], dtype=s[key].dtype)
            rows.append(torch.cat([s[key], extra]))
        batch[key] = torch.stack(rows)
    return batch
