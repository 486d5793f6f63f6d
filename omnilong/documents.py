"""Packed rows: several documents in one row of tokens, told apart by ``document_ids``.

Shared by the data (a packed text row's positions) and the models (positions of a batch that
comes without them).
"""

import torch


def positions_within_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """``[T]`` offset of each token from the first token of its (contiguous) document segment."""
    t = document_ids.shape[-1]
    index = torch.arange(t)
    starts = torch.zeros(t, dtype=torch.bool)
    starts[0] = True
    starts[1:] = document_ids[1:] != document_ids[:-1]
    segment_start = torch.cummax(torch.where(starts, index, 0), dim=0).values
    return index - segment_start
