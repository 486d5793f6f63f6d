"""Variable-length attention over packed tokens: many independent sequences in one call.

Tokens are packed along the first dimension (``[N, H, D]``, the layout of flash
attention's varlen kernels). A :class:`VarlenSegments` says which query rows attend which
key rows: segment ``i`` is queries ``cu_q[i]:cu_q[i+1]`` against keys
``cu_k[i]:cu_k[i+1]``, causally (query ``j`` of a segment sees keys ``0..j`` of it, top-left
aligned) or fully. Segments are built once per batch (an attention plan) and used by
every layer, so no call here reads a tensor back to the host.

Kernels, by device and dtype:

* CUDA, fp16/bf16: PyTorch's flash-attention varlen op (``aten._flash_attention_forward``
  with cumulative lengths, the kernel behind ``torch.nn.attention.varlen.varlen_attn``),
  one call for all segments; see :mod:`omnilong.models._cuda_attention`.
* CPU: the SDPA flash op for CPU, one call per segment on views of the packed tensors
  (the segment bounds are host integers of the plan, so the loop does not sync).
* CUDA, fp32 (which flash attention rejects): the same per-segment loop over exact
  attention in fp32.

Every kernel accepts grouped-query key/value (``Hkv`` divides ``Hq``) without repeating
heads, and returns the log-sum-exp ``lse`` in float32 as ``[Hq, N]``.
"""

from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class VarlenSegments:
    """Which packed query rows attend which packed key rows.

    Attributes:
        cu_q: ``[n + 1]`` int32 cumulative query lengths, on the compute device.
        cu_k: ``[n + 1]`` int32 cumulative key lengths, on the compute device.
        max_q: longest query segment.
        max_k: longest key segment.
        bounds: ``((q_start, q_end, k_start, k_end), ...)`` the same segments as host
            integers, for the per-segment kernels.
        causal: every segment is causal (else every segment is fully visible).
    """

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    bounds: tuple[tuple[int, int, int, int], ...]
    causal: bool

    @classmethod
    def from_lengths(
        cls, q_lengths: list[int], k_lengths: list[int], causal: bool, device: torch.device
    ) -> "VarlenSegments":
        """Segments of the given query and key lengths, packed back to back in order."""
        if len(q_lengths) != len(k_lengths) or not q_lengths:
            raise ValueError(f"need as many query as key segments, at least one: {len(q_lengths)} vs {len(k_lengths)}")
        cu_q, cu_k = [0], [0]
        for lq, lk in zip(q_lengths, k_lengths):
            cu_q.append(cu_q[-1] + lq)
            cu_k.append(cu_k[-1] + lk)
        bounds = tuple(zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]))
        as_tensor = lambda cu: torch.tensor(cu, dtype=torch.int32).to(device, non_blocking=True)  # noqa: E731
        return cls(as_tensor(cu_q), as_tensor(cu_k), max(q_lengths), max(k_lengths), bounds, causal)


def runs_of_equal_ids(ids: list[int]) -> list[tuple[int, int, int]]:
    """``[(id, start, end), ...]`` of the runs of equal values in a host list of ids."""
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            runs.append((ids[start], start, i))
            start = i
    return runs


def uses_flash_kernel(q: torch.Tensor) -> bool:
    """Whether varlen attention of ``q`` runs as one flash-attention call (fp16/bf16 on CUDA)."""
    return q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)


def varlen_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: VarlenSegments
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query segment over its key segment.

    Args:
        q: ``[Nq, Hq, D]`` packed queries, ``Nq = segments.bounds[-1][1]``.
        k: ``[Nk, Hkv, D]`` packed keys, ``Nk = segments.bounds[-1][3]``.
        v: ``[Nk, Hkv, D]`` packed values.
        segments: the segments (every query row belongs to one).

    Returns:
        ``out [Nq, Hq, D]`` in ``q.dtype`` and ``lse [Hq, Nq]`` float32.
    """
    if uses_flash_kernel(q):
        from omnilong.models._cuda_attention import flash_varlen_forward

        return flash_varlen_forward(q, k, v, segments)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    for qa, qb, ka, kb in segments.bounds:
        o, l = _segment_forward(_heads_first(q[qa:qb]), _heads_first(k[ka:kb]), _heads_first(v[ka:kb]), segments.causal)
        out[qa:qb] = o[0].transpose(0, 1)
        lse[:, qa:qb] = l[0]
    return out, lse


def varlen_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    segments: VarlenSegments,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`varlen_attention_forward`, given ``out`` and ``lse``.

    ``out``/``lse`` may be those of a larger attention that this one is a part of (ring
    attention passes its merged result): with ``P = exp(q k^T / sqrt(D) - lse)`` and
    ``delta = rowsum(dout * out)``, ``dv = P^T dout``, ``dS = P * (dout v^T - delta)``,
    ``dq = dS k / sqrt(D)``, ``dk = dS^T q / sqrt(D)`` (summed over the query heads of
    each kv head) are this part's share of the gradients.

    Args:
        dout: ``[Nq, Hq, D]``; ``q, k, v, segments`` as in the forward.
        out: ``[Nq, Hq, D]`` (dtype of ``q``); ``lse``: ``[Hq, Nq]`` float32, finite.

    Returns:
        ``dq [Nq, Hq, D]``, ``dk, dv [Nk, Hkv, D]`` in the inputs' dtype.
    """
    if uses_flash_kernel(q):
        from omnilong.models._cuda_attention import flash_varlen_backward

        return flash_varlen_backward(dout, q, k, v, out, lse, segments)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qa, qb, ka, kb in segments.bounds:
        gq, gk, gv = _segment_backward(
            *(_heads_first(x) for x in (dout[qa:qb], q[qa:qb], k[ka:kb], v[ka:kb], out[qa:qb])),
            lse[None, :, qa:qb], segments.causal)
        dq[qa:qb] += gq[0].transpose(0, 1)
        dk[ka:kb] += gk[0].transpose(0, 1)
        dv[ka:kb] += gv[0].transpose(0, 1)
    return dq, dk, dv


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``[L, H, D]`` -> ``[1, H, L, D]`` (a view)."""
    return x.transpose(0, 1).unsqueeze(0)


def _segment_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment, ``[1, H, L, D]`` layout: ``(out [1, Hq, Lq, D], lse [1, Hq, Lq])``."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
        return out, lse.float()
    scores = _scores(q, k, causal)  # [1, Hq, Lq, Lk] fp32
    lse = scores.logsumexp(-1)
    out = torch.exp(scores - lse[..., None]) @ _repeat_kv(v, q.shape[1]).float()
    return out.to(q.dtype), lse


def _segment_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one segment in ``[1, H, L, D]`` layout (formulas: :func:`varlen_attention_backward`)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.contiguous(), 0.0, causal)
    scale, group = q.shape[-1] ** -0.5, q.shape[1] // k.shape[1]
    p = torch.exp(_scores(q, k, causal) - lse[..., None])  # [1, Hq, Lq, Lk]
    dout32, v32 = dout.float(), _repeat_kv(v, q.shape[1]).float()
    dv = p.transpose(-1, -2) @ dout32
    ds = p * (dout32 @ v32.transpose(-1, -2) - (dout32 * out.float()).sum(-1, keepdim=True))
    dq = ds @ _repeat_kv(k, q.shape[1]).float() * scale
    dk = ds.transpose(-1, -2) @ q.float() * scale
    fold = lambda g: g.unflatten(1, (k.shape[1], group)).sum(2).to(k.dtype)  # noqa: E731  [1, Hkv, Lk, D]
    return dq.to(q.dtype), fold(dk), fold(dv)


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """``q k^T / sqrt(D)`` in fp32, ``-inf`` above the diagonal when causal: ``[1, Hq, Lq, Lk]``."""
    scores = q.float() @ _repeat_kv(k, q.shape[1]).float().transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        hidden = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores


def _repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[1, Hkv, L, D]`` -> ``[1, n_heads, L, D]``, each kv head serving its query group."""
    return x.repeat_interleave(n_heads // x.shape[1], dim=1)


class VarlenAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`varlen_attention_forward` / :func:`varlen_attention_backward`."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: VarlenSegments) -> torch.Tensor:
        """``q [Nq, Hq, D]``, ``k, v [Nk, Hkv, D]`` -> ``out [Nq, Hq, D]``."""
        out, lse = varlen_attention_forward(q, k, v, segments)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.segments = segments
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = varlen_attention_backward(dout.contiguous(), q, k, v, out, lse, ctx.segments)
        return dq, dk, dv, None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: VarlenSegments) -> torch.Tensor:
    """Differentiable varlen attention: ``q [Nq, Hq, D]``, ``k, v [Nk, Hkv, D]`` -> ``[Nq, Hq, D]``."""
    return VarlenAttentionFunction.apply(q, k, v, segments)


def pack_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` -> the packed layout ``[B * T, H, D]`` (rows one after another)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b * t, h, d)


def unpack_tokens(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of :func:`pack_tokens`: ``[B * T, H, D]`` -> ``[B, H, T, D]`` (a view)."""
    return x.view(batch, -1, x.shape[1], x.shape[2]).transpose(1, 2)
