"""Variable-length attention over packed tokens: the segments every attention is described
by, and the kernels that run on any device.

Tokens are packed along the first dimension (``[N, H, D]``, the layout of flash
attention's varlen kernels). A :class:`VarlenSegments` says which query rows attend which
key rows: segment ``i`` is queries ``cu_q[i]:cu_q[i+1]`` against keys
``cu_k[i]:cu_k[i+1]``, causally (query ``j`` of a segment sees keys ``0..j`` of it, top-left
aligned) or fully. Segments are built once per batch (an attention plan) and used by
every layer, so no kernel reads a tensor back to the host.

An :class:`AttentionKernel` computes attention over segments, forward with the
log-sum-exp and backward given any ``(out, lse)``. Which kernel runs is decided in one place,
:func:`omnilong.models.attention.kernel_for`; the kernels here are the portable ones
(:data:`CPU_FLASH`, :data:`EXACT`), the CUDA one is in :mod:`omnilong.models._cuda_attention`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial

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
            integers, for the kernels that loop.
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

    @cached_property
    def batches(self) -> tuple[tuple[int, int, int, int, int], ...]:
        """``((q_start, k_start, n, Lq, Lk), ...)``: the runs of consecutive segments of equal
        lengths (``n`` of them, back to back), each attended as one ``[n, H, L, D]`` batch. Rows
        of one sequence each (``B`` segments of ``T``) are one batch."""
        runs: list[list[int]] = []  # [q_start, k_start, n, Lq, Lk]
        for qa, qb, ka, kb in self.bounds:
            lq, lk = qb - qa, kb - ka
            if (
                runs
                and runs[-1][3:] == [lq, lk]
                and [qa, ka] == [runs[-1][0] + runs[-1][2] * lq, runs[-1][1] + runs[-1][2] * lk]
            ):
                runs[-1][2] += 1
            else:
                runs.append([qa, ka, 1, lq, lk])
        return tuple(tuple(run) for run in runs)


@dataclass(frozen=True)
class AttentionKernel:
    """Attention over :class:`VarlenSegments`, as a pair of functions.

    ``forward(q, k, v, segments) -> (out, lse)``: ``q [Nq, Hq, D]``, ``k, v [Nk, Hkv, D]``
    packed (``Hkv`` divides ``Hq``; grouped-query key/value are served without repeating
    heads; every query row belongs to one segment, each segment has a key); ``out [Nq, Hq, D]``
    in ``q.dtype``, ``lse [Hq, Nq]`` float32.

    ``backward(dout, q, k, v, out, lse, segments) -> (dq, dk, dv)`` in the inputs' dtypes.
    ``out``/``lse`` may be those of a larger attention that this one is a part of (ring
    attention passes its merged result): with ``P = exp(q k^T / sqrt(D) - lse)`` and
    ``delta = rowsum(dout * out)``, ``dv = P^T dout``, ``dS = P * (dout v^T - delta)``,
    ``dq = dS k / sqrt(D)``, ``dk = dS^T q / sqrt(D)`` (summed over the query heads of
    each kv head) are this part's share of the gradients.
    """

    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def runs_of_equal_ids(ids: list[int]) -> list[tuple[int, int, int]]:
    """``[(id, start, end), ...]`` of the runs of equal values in a host list of ids."""
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            runs.append((ids[start], start, i))
            start = i
    return runs


def _batch(x: torch.Tensor, start: int, n: int, length: int) -> torch.Tensor:
    """The ``n`` segments of ``length`` rows from packed row ``start``: ``[n, H, length, D]`` (a view)."""
    return x[start : start + n * length].unflatten(0, (n, length)).transpose(1, 2)


def _unbatch(x: torch.Tensor) -> torch.Tensor:
    """``[n, H, L, D]`` -> packed ``[n * L, H, D]``."""
    return x.transpose(1, 2).flatten(0, 1)


BatchForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]
BatchBackward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _batched_forward(
    batch_forward: BatchForward, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: VarlenSegments
) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel's ``forward`` from one of ``[n, H, L, D]`` batches: one call per run of equal segments."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    for qa, ka, n, lq, lk in segments.batches:
        o, batch_lse = batch_forward(_batch(q, qa, n, lq), _batch(k, ka, n, lk), _batch(v, ka, n, lk), segments.causal)
        out[qa : qa + n * lq] = _unbatch(o)
        lse[:, qa : qa + n * lq] = batch_lse.transpose(0, 1).flatten(1)  # [n, Hq, lq] -> [Hq, n * lq]
    return out, lse


def _batched_backward(
    batch_backward: BatchBackward,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    segments: VarlenSegments,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A kernel's ``backward`` from one of ``[n, H, L, D]`` batches (the runs of the forward)."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qa, ka, n, lq, lk in segments.batches:
        rows_lse = lse[:, qa : qa + n * lq].unflatten(1, (n, lq)).transpose(0, 1)  # [n, Hq, lq]
        gq, gk, gv = batch_backward(
            *(_batch(x, qa, n, lq) for x in (dout, q)),
            _batch(k, ka, n, lk),
            _batch(v, ka, n, lk),
            _batch(out, qa, n, lq),
            rows_lse,
            segments.causal,
        )
        dq[qa : qa + n * lq] = _unbatch(gq)
        dk[ka : ka + n * lk] = _unbatch(gk)
        dv[ka : ka + n * lk] = _unbatch(gv)
    return dq, dk, dv


def _cpu_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The SDPA flash op for CPU (what ``F.scaled_dot_product_attention`` runs there):
    ``[n, H, L, D]`` -> ``(out [n, Hq, Lq, D], lse [n, Hq, Lq] float32)``."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    return out, lse.float()


def _cpu_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_cpu_forward`, ``[n, H, L, D]`` layout."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse.contiguous(), 0.0, causal
    )


def _exact_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention in fp32, ``[n, H, L, D]`` layout: ``(out [n, Hq, Lq, D], lse [n, Hq, Lq])``."""
    scores = _scores(q, k, causal)  # [n, Hq, Lq, Lk] fp32
    lse = scores.logsumexp(-1)
    out = torch.exp(scores - lse[..., None]) @ _repeat_kv(v, q.shape[1]).float()
    return out.to(q.dtype), lse


def _exact_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_exact_forward` (formulas: :class:`AttentionKernel`)."""
    scale, group = q.shape[-1] ** -0.5, q.shape[1] // k.shape[1]
    p = torch.exp(_scores(q, k, causal) - lse[..., None])  # [n, Hq, Lq, Lk]
    dout32, v32 = dout.float(), _repeat_kv(v, q.shape[1]).float()
    dv = p.transpose(-1, -2) @ dout32
    ds = p * (dout32 @ v32.transpose(-1, -2) - (dout32 * out.float()).sum(-1, keepdim=True))
    dq = ds @ _repeat_kv(k, q.shape[1]).float() * scale
    dk = ds.transpose(-1, -2) @ q.float() * scale
    fold = lambda g: g.unflatten(1, (k.shape[1], group)).sum(2).to(k.dtype)  # noqa: E731  [n, Hkv, Lk, D]
    return dq.to(q.dtype), fold(dk), fold(dv)


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """``q k^T / sqrt(D)`` in fp32, ``-inf`` above the diagonal when causal: ``[n, Hq, Lq, Lk]``."""
    scores = q.float() @ _repeat_kv(k, q.shape[1]).float().transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        hidden = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores


def _repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[n, Hkv, L, D]`` -> ``[n, n_heads, L, D]``, each kv head serving its query group."""
    return x.repeat_interleave(n_heads // x.shape[1], dim=1)


CPU_FLASH = AttentionKernel(partial(_batched_forward, _cpu_forward), partial(_batched_backward, _cpu_backward))
"""CPU, any dtype: the SDPA flash op for CPU, one call per run of equal segments on views of
the packed tensors (the runs are host integers of the segments, so the loop does not sync)."""

EXACT = AttentionKernel(partial(_batched_forward, _exact_forward), partial(_batched_backward, _exact_backward))
"""Elsewhere (CUDA in fp32, which flash attention rejects): exact attention in fp32, batched
like :data:`CPU_FLASH`; it materialises each run's ``[n, Hq, Lq, Lk]`` scores."""


def pack_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` -> the packed layout ``[B * T, H, D]`` (rows one after another)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b * t, h, d)


def unpack_tokens(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of :func:`pack_tokens`: ``[B * T, H, D]`` -> ``[B, H, T, D]`` (a view)."""
    return x.view(batch, -1, x.shape[1], x.shape[2]).transpose(1, 2)
