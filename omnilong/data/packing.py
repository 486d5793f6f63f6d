"""Several instruction-tuning samples in one row of at most ``max_seq_len`` tokens.

Which samples share a row is decided once, from the samples' token counts alone
(:func:`pack_rows`), so it depends only on the data and ``max_seq_len``: every rank
computes the same rows, and a resumed run sees the same rows in the same order (the
sampler then orders rows, not samples). A row's item concatenates its samples' items
(:func:`concat_documents`): document ids ``0..k-1``, each document's positions counted
from 0, labels as each sample has them (a sample's last token predicts nothing, so no
label crosses documents) and the vision tensors in token order. Attention never crosses
documents (``document_ids``), on one device or around the context-parallel ring.
"""

import bisect
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from omnilong.data.collate import VISION_KEYS

#: Per-token keys of an item, concatenated along the sequence (their last dim).
_TOKEN_KEYS = ("input_ids", "labels", "position_ids", "decode_failures")


def pack_rows(lengths: Sequence[int], max_seq_len: int) -> list[list[int]]:
    """Assign samples to rows by best-fit decreasing.

    Samples are taken longest first (ties: lower index first); each goes into the open row
    with the least room left that still holds it (ties: the row opened first), or opens a
    new row. Deterministic, ``O(n log n)`` searches, and within ``11/9`` of the fewest rows
    possible plus a constant (it never does worse than first-fit decreasing's bound).

    Args:
        lengths: tokens of each sample, each in ``1..max_seq_len``.
        max_seq_len: most tokens per row.

    Returns:
        The rows, in the order they were opened; each lists its sample indices ascending
        (data order).

    Raises:
        ValueError: a sample longer than ``max_seq_len`` or empty (names its index).
    """
    bad = next((i for i, n in enumerate(lengths) if not 0 < n <= max_seq_len), None)
    if bad is not None:
        raise ValueError(f"sample {bad} has {lengths[bad]} tokens; packing needs 1..max_seq_len={max_seq_len}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (room left, row), ascending
    for i in order:
        slot = bisect.bisect_left(open_rows, (lengths[i], -1))
        if slot == len(open_rows):
            rows.append([])
            room, row = max_seq_len, len(rows) - 1
        else:
            room, row = open_rows.pop(slot)
        rows[row].append(i)
        if room - lengths[i] > 0:
            bisect.insort(open_rows, (room - lengths[i], row))
    return [sorted(row) for row in rows]


def concat_documents(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The item of one packed row: ``items`` (one sample each) back to back.

    Args:
        items: samples' items with ``input_ids`` and ``labels`` ``[T_i]``, optionally
            ``position_ids`` ``[T_i]`` (each counted from 0), ``document_ids`` (replaced),
            vision tensors (:data:`VISION_KEYS`) and a 0-d ``skipped`` flag.

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` (if the items have them) and
        ``document_ids`` ``[sum T_i]`` (document ``d`` = ``items[d]``); vision tensors
        concatenated along dim 0 in order; ``skipped``: 0-d int64, how many of the samples
        are skipped placeholders.
    """
    lengths = torch.tensor([item["input_ids"].shape[-1] for item in items])
    row = {"document_ids": torch.repeat_interleave(torch.arange(len(items)), lengths)}
    for key in items[0]:
        values = [item[key] for item in items]
        if key in _TOKEN_KEYS:
            row[key] = torch.cat(values, dim=-1)
        elif key in VISION_KEYS:
            row[key] = torch.cat(values)
        elif key == "skipped":
            row[key] = torch.stack(values).long().sum()
        elif key != "document_ids":
            raise ValueError(f"cannot pack items holding {key!r}")
    return row


class PackedDataset(Dataset):
    """Rows of several samples of ``samples`` (see the module docstring).

    Attributes the wrapped dataset offers (``pad_id``, ``num_skipped``, token ids, ...) are
    read through to it.

    Args:
        samples: a dataset of one-sample items (``samples[i]`` is sample ``i``).
        lengths: ``len(samples)`` token counts, exactly those of the items.
        max_seq_len: most tokens per row.

    Raises:
        ValueError: ``lengths`` does not match ``samples`` or a sample does not fit a row.
    """

    def __init__(self, samples: Dataset, lengths: Sequence[int], max_seq_len: int):
        if len(lengths) != len(samples):
            raise ValueError(f"packing got {len(lengths)} lengths for {len(samples)} samples")
        self.samples, self.max_seq_len = samples, max_seq_len
        self.rows = pack_rows(lengths, max_seq_len)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Row ``index``: :func:`concat_documents` of its samples' items, at most ``max_seq_len`` tokens."""
        row = concat_documents([self.samples[i] for i in self.rows[index]])
        if row["input_ids"].shape[-1] > self.max_seq_len:
            raise ValueError(
                f"packed row {index} (samples {self.rows[index]}) has {row['input_ids'].shape[-1]} "
                f"tokens, more than max_seq_len={self.max_seq_len}: its samples' lengths were wrong"
            )
        return row

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "samples":  # unpickling (DataLoader workers) looks these up first
            raise AttributeError(name)
        return getattr(self.samples, name)


def packed_or_not(dataset: Dataset, packed: bool) -> Dataset:
    """``dataset`` packed into rows of its ``max_seq_len`` by its ``sample_lengths()`` when
    ``packed``, else ``dataset`` itself (one sample per row)."""
    return PackedDataset(dataset, dataset.sample_lengths(), dataset.max_seq_len) if packed else dataset
