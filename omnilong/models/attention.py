"""The one attention entry point of OmniLong: every attention computation goes through here.

**Kernels.** All attention is attention over :class:`VarlenSegments` of packed tokens
(``[N, H, D]``), causal or not: the decoder's rows or packed documents, the vision towers'
windows, frame pairs and images, the ring's per-step block pieces, a decode step's new token
against the cached keys. :func:`kernel_for` picks the :class:`AttentionKernel` that runs it,
by device and dtype; it is the only place that does, so a new kernel is added there and
every caller uses it. The callers:

* :func:`attention` (differentiable): :class:`CausalAttention` (the decoder), the Qwen2.5-VL
  vision tower's window/frame attention and SigLIP's per-image attention;
* :func:`attention_with_lse` and :func:`attention_backward`: ring attention's local steps
  (:mod:`omnilong.parallel.ring_attention`) and cached decoding
  (:mod:`omnilong.generation.kv_cache`), which merge partial results by their log-sum-exp.

**The decoder's core.** Each decoder layer's attention calls its ``core`` submodule, an
instance of :class:`CausalAttention` on a single device. ``omnilong.parallel`` swaps that
submodule for a context-parallel implementation with the same interface (and generation wraps
it in a key/value cache); the model code never changes. The interface has two halves.
``core.plan(input_ids, document_ids)`` runs once per batch, before the first layer: it turns
the batch's document ids into whatever the kernels need (varlen segments, the ring's per-step
pieces), reading them back to the host once. ``core(q, k, v, plan)`` runs in every layer (and
again in the activation-checkpoint recompute and in backward) and never copies anything to
the host.
"""

from typing import Any

import torch
from torch import nn

from omnilong.kernel_device import kernel_device_type
from omnilong.models.varlen_attention import (
    CPU_FLASH,
    EXACT,
    AttentionKernel,
    VarlenSegments,
    pack_tokens,
    runs_of_equal_ids,
    unpack_tokens,
)

#: the least CUDA compute capability of PyTorch's flash-attention kernels (Ampere)
FLASH_MIN_CAPABILITY = (8, 0)


def check_attention_device(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before any work, a CUDA GPU that :func:`kernel_for`'s kernel cannot run on:
    in fp16/bf16 every attention on CUDA is PyTorch's flash-attention kernel, which needs
    compute capability 8.0 (Ampere) or newer; without this check the first attention call fails.

    Raises:
        ValueError: an older GPU (names it, its capability and the fix).
    """
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < FLASH_MIN_CAPABILITY:
        raise ValueError(
            f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}) cannot run "
            f"flash attention, which every attention in {str(dtype).removeprefix('torch.')} on CUDA uses: it needs "
            "compute capability 8.0 or newer (Ampere: A100, A10, L40S, H100, H200, RTX 30xx and newer). Run on such "
            "a GPU (dtype: fp32 runs exact attention, which holds every score: for short checks only)"
        )


def kernel_for(q: torch.Tensor) -> AttentionKernel:
    """The kernel that attends ``q``: the one place where attention kernels are chosen.

    * CUDA, fp16/bf16: PyTorch's flash-attention varlen op, all segments in one call
      (:mod:`omnilong.models._cuda_attention`, imported only here and only then);
    * CPU: the SDPA flash op for CPU, one call per run of equal segments;
    * elsewhere (CUDA in fp32, which flash attention rejects): exact attention in fp32.
    """
    device_type = kernel_device_type(q)
    if device_type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        from omnilong.models._cuda_attention import FLASH_VARLEN

        return FLASH_VARLEN
    return CPU_FLASH if device_type == "cpu" else EXACT


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: VarlenSegments
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query segment over its key segment, with its log-sum-exp (no autograd).

    Args:
        q: ``[Nq, Hq, D]`` packed queries, every row in one segment.
        k: ``[Nk, Hkv, D]`` packed keys, ``Hq % Hkv == 0``.
        v: ``[Nk, Hkv, D]`` packed values.
        segments: the segments, each with at least one key.

    Returns:
        ``out [Nq, Hq, D]`` in ``q.dtype`` and ``lse [Hq, Nq]`` float32.
    """
    return kernel_for(q).forward(q, k, v, segments)


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    segments: VarlenSegments,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`attention_with_lse` given ``out [Nq, Hq, D]`` and ``lse [Hq, Nq]``,
    which may be those of a larger attention this one is part of (formulas:
    :class:`AttentionKernel`).

    Returns:
        ``dq [Nq, Hq, D]``, ``dk, dv [Nk, Hkv, D]`` in the inputs' dtype.
    """
    return kernel_for(q).backward(dout, q, k, v, out, lse, segments)


class _AttentionFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`attention_with_lse` / :func:`attention_backward`."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: VarlenSegments) -> torch.Tensor:
        """``q [Nq, Hq, D]``, ``k, v [Nk, Hkv, D]`` -> ``out [Nq, Hq, D]``."""
        out, lse = attention_with_lse(q, k, v, segments)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.segments = segments
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout.contiguous(), q, k, v, out, lse, ctx.segments)
        return dq, dk, dv, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: VarlenSegments) -> torch.Tensor:
    """Differentiable attention over segments: ``q [Nq, Hq, D]``, ``k, v [Nk, Hkv, D]`` packed ->
    ``[Nq, Hq, D]`` (see :func:`attention_with_lse`)."""
    return _AttentionFunction.apply(q, k, v, segments)


def row_segments(batch: int, length: int, causal: bool, device: torch.device) -> VarlenSegments:
    """``batch`` rows of ``length`` tokens, each one sequence (one batched kernel call)."""
    return VarlenSegments.from_lengths([length] * batch, [length] * batch, causal, device)


def document_segments(document_ids: torch.Tensor) -> VarlenSegments | None:
    """Causal varlen segments of a packed batch: one per run of equal ids in each row.

    Tokens are packed row after row (``[B * T]``), so segment boundaries never cross rows.
    Reads ``document_ids`` back to the host once.

    Args:
        document_ids: ``[B, T]``; documents must be contiguous runs, as packing and
            padding produce.

    Returns:
        The segments, or ``None`` when every row is a single document (causal attention of
        whole rows, :func:`row_segments`, is then exact, and one batched call).
    """
    lengths = [end - start for row in document_ids.tolist() for _, start, end in runs_of_equal_ids(row)]
    if len(lengths) == document_ids.shape[0]:
        return None
    return VarlenSegments.from_lengths(lengths, lengths, causal=True, device=document_ids.device)


class CausalAttention(nn.Module):
    """Causal attention on one device, with packed-document masking.

    A packed batch is attended with one varlen kernel call per layer over all its
    documents (:func:`attention`), so no ``T x T`` mask is ever built. Grouped-query
    attention is served without repeating key/value heads.
    """

    def plan(self, input_ids: torch.Tensor | None, document_ids: torch.Tensor | None) -> VarlenSegments:
        """The batch's attention plan: its document segments (see :func:`document_segments`),
        or one causal segment per row for rows of one sequence each.

        Args:
            input_ids: ``[B, T]`` (for the shape and device when there are no document ids).
            document_ids: ``[B, T]`` or ``None``.
        """
        segments = None if document_ids is None else document_segments(document_ids)
        if segments is not None:
            return segments
        ids = input_ids if document_ids is None else document_ids
        return row_segments(ids.shape[0], ids.shape[1], causal=True, device=ids.device)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plan: VarlenSegments | None = None,
    ) -> torch.Tensor:
        """
        Args:
            q: ``[B, Hq, T, D]`` queries (rotary already applied).
            k: ``[B, Hkv, T, D]`` keys, ``Hq % Hkv == 0``.
            v: ``[B, Hkv, T, D]`` values.
            plan: :meth:`plan` of the batch (``None``: rows of one sequence each, planned here).

        Returns:
            ``[B, Hq, T, D]`` attention output.
        """
        if plan is None:
            plan = row_segments(q.shape[0], q.shape[2], causal=True, device=q.device)
        out = attention(pack_tokens(q), pack_tokens(k), pack_tokens(v), plan)  # [B * T, Hq, D]
        return unpack_tokens(out, q.shape[0])
