"""CUDA only: PyTorch's flash-attention varlen kernel (FlashAttention-2, built into torch).

:data:`FLASH_VARLEN`, chosen by :func:`omnilong.models.attention.kernel_for` for fp16/bf16
CUDA tensors and imported there lazily; never on CPU. The ops are
``aten._flash_attention_forward`` / ``_backward`` called with cumulative sequence lengths,
as ``torch.nn.attention.varlen.varlen_attn`` calls them (present with this signature in
torch 2.11 and 2.14). They are used directly rather than
through ``varlen_attn`` because ring attention needs the backward on its own, given the
ring's merged output and log-sum-exp.
"""

import torch

from omnilong.models.varlen_attention import AttentionKernel, VarlenSegments


def flash_varlen_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: VarlenSegments
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [Nq, Hq, D]``, ``k, v [Nk, Hkv, D]`` -> ``out [Nq, Hq, D]``, ``lse [Hq, Nq]`` float32."""
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        segments.cu_q,
        segments.cu_k,
        segments.max_q,
        segments.max_k,
        0.0,
        segments.causal,
        False,
    )
    if tuple(lse.shape) != (q.shape[1], q.shape[0]):
        raise RuntimeError(
            f"this torch's flash varlen kernel returned lse of shape {tuple(lse.shape)}, expected "
            f"[heads, tokens] = {(q.shape[1], q.shape[0])}: OmniLong needs torch >= 2.11"
        )
    return out, lse


def flash_varlen_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    segments: VarlenSegments,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients given ``out [Nq, Hq, D]`` and ``lse [Hq, Nq]`` (shapes of the forward)."""
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # dropout is off: unused
    unused = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout.contiguous(),
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        out.contiguous(),
        lse.contiguous(),
        segments.cu_q,
        segments.cu_k,
        segments.max_q,
        segments.max_k,
        0.0,
        segments.causal,
        rng_state,
        unused,
    )
    return dq, dk, dv


FLASH_VARLEN = AttentionKernel(flash_varlen_forward, flash_varlen_backward)
"""All segments in one flash-attention call, forward and backward."""
