"""The one attention entry point of every OmniLong model.

Each decoder layer's attention calls its ``core`` submodule, an instance of
:class:`CausalAttention` on a single device. ``omnilong.parallel`` swaps that
submodule for a context-parallel implementation with the same ``forward``
signature; the model code never changes.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def document_segments(document_ids: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the runs of equal ids in a ``[T]`` document-id row."""
    change = (document_ids[1:] != document_ids[:-1]).nonzero().squeeze(1) + 1
    bounds = [0, *change.tolist(), document_ids.shape[0]]
    return list(zip(bounds[:-1], bounds[1:]))


class CausalAttention(nn.Module):
    """Causal scaled-dot-product attention on one device, with packed-document masking.

    Packed rows (``document_ids`` given) are attended document by document, each run of
    equal ids causally on its own, so no ``T x T`` mask is ever built; ids must form
    contiguous runs, as packing and padding produce. Grouped-query attention is served
    without repeating key/value heads.
    """

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        document_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            q: ``[B, Hq, T, D]`` queries (rotary already applied).
            k: ``[B, Hkv, T, D]`` keys, ``Hq % Hkv == 0``.
            v: ``[B, Hkv, T, D]`` values.
            document_ids: ``[B, T]`` document id per token of a packed row, or ``None``
                when each row is one sequence.

        Returns:
            ``[B, Hq, T, D]`` attention output.
        """
        enable_gqa = q.shape[1] != k.shape[1]
        if document_ids is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
        rows = []
        for b in range(q.shape[0]):
            segments = [
                F.scaled_dot_product_attention(
                    q[b : b + 1, :, lo:hi], k[b : b + 1, :, lo:hi], v[b : b + 1, :, lo:hi],
                    is_causal=True, enable_gqa=enable_gqa,
                )
                for lo, hi in document_segments(document_ids[b])
            ]
            rows.append(torch.cat(segments, dim=2))
        return torch.cat(rows, dim=0)  # [B, Hq, T, D]
