"""The one attention entry point of every OmniLong model.

Each decoder layer's attention calls its ``core`` submodule, an instance of
:class:`CausalAttention` on a single device. ``omnilong.parallel`` swaps that
submodule for a context-parallel implementation with the same interface; the model
code never changes.

The interface has two halves. ``core.plan(input_ids, document_ids)`` runs once per batch, before
the first layer: it turns the batch's document ids into whatever the kernels need
(varlen segments, the ring's per-step pieces), reading them back to the host once.
``core(q, k, v, plan)`` runs in every layer (and again in the activation-checkpoint
recompute and in backward) and never copies anything to the host.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from omnilong.models.varlen_attention import (
    VarlenSegments,
    pack_tokens,
    runs_of_equal_ids,
    unpack_tokens,
    varlen_attention,
)


def document_segments(document_ids: torch.Tensor) -> Optional[VarlenSegments]:
    """Causal varlen segments of a packed batch: one per run of equal ids in each row.

    Tokens are packed row after row (``[B * T]``), so segment boundaries never cross rows.
    Reads ``document_ids`` back to the host once.

    Args:
        document_ids: ``[B, T]``; documents must be contiguous runs, as packing and
            padding produce.

    Returns:
        The segments, or ``None`` when every row is a single document (plain causal
        attention of whole rows is then exact, and faster).
    """
    lengths = [end - start for row in document_ids.tolist() for _, start, end in runs_of_equal_ids(row)]
    if len(lengths) == document_ids.shape[0]:
        return None
    return VarlenSegments.from_lengths(lengths, lengths, causal=True, device=document_ids.device)


class CausalAttention(nn.Module):
    """Causal attention on one device, with packed-document masking.

    A packed batch is attended with one varlen kernel call per layer over all its
    documents (:mod:`omnilong.models.varlen_attention`), so no ``T x T`` mask is ever
    built. Grouped-query attention is served without repeating key/value heads.
    """

    def plan(self, input_ids: torch.Tensor, document_ids: Optional[torch.Tensor]) -> Optional[VarlenSegments]:
        """The batch's attention plan: its document segments (see :func:`document_segments`),
        ``None`` for rows of one sequence each.

        Args:
            input_ids: ``[B, T]`` (unused here; context parallelism's plan needs the shape).
            document_ids: ``[B, T]`` or ``None``.
        """
        return None if document_ids is None else document_segments(document_ids)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plan: Optional[VarlenSegments] = None,
    ) -> torch.Tensor:
        """
        Args:
            q: ``[B, Hq, T, D]`` queries (rotary already applied).
            k: ``[B, Hkv, T, D]`` keys, ``Hq % Hkv == 0``.
            v: ``[B, Hkv, T, D]`` values.
            plan: :meth:`plan` of the batch.

        Returns:
            ``[B, Hq, T, D]`` attention output.
        """
        if plan is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        out = varlen_attention(pack_tokens(q), pack_tokens(k), pack_tokens(v), plan)  # [B * T, Hq, D]
        return unpack_tokens(out, q.shape[0])
