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


def document_causal_mask(document_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask for causal attention that never crosses a document boundary.

    Args:
        document_ids: ``[B, T]`` integer id of the document each token belongs to.
        dtype: dtype of the returned mask (that of the query).

    Returns:
        ``[B, 1, T, T]`` mask: 0 where query ``i`` may attend key ``j`` (``j <= i`` and
        same document), ``-inf`` elsewhere.
    """
    t = document_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # [B, T, T]
    allowed = (same_doc & causal)[:, None]  # [B, 1, T, T]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=document_ids.device)
    return mask.masked_fill_(~allowed, float("-inf"))


class CausalAttention(nn.Module):
    """Causal scaled-dot-product attention on one device, with packed-document masking.

    Grouped-query attention is served without repeating key/value heads.
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
        mask = document_causal_mask(document_ids, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
