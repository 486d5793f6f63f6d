"""Ring attention over the context-parallel (cp) group, for zigzag-sharded sequences.

Every cp rank keeps its query shard; the key/value shards (with their document ids)
travel the ring, rank ``r`` sending to ``r + 1`` and receiving from ``r - 1``, so at
step ``s`` rank ``r`` holds the key/value shard of rank ``(r - s) mod cp``. Each step
attends the local queries to the held block (:mod:`.attention_kernels`) while the next
block is already in flight, and merges the partial result with the log-sum-exp rule.
The backward makes the same trip and carries the accumulated ``dK``/``dV`` of each block
with it, one hop behind, until they are home.

The zigzag layout (:mod:`.sequence_sharding`) makes every step's block pair either
diagonal, fully visible or fully hidden chunk by chunk (see :func:`zigzag_block`), so
each step is one kernel call over exactly the visible half of the work.
"""

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from omnilong.parallel.attention_kernels import block_attention, block_attention_backward


class _KV(NamedTuple):
    """The block that travels the ring: ``k, v [B, Hkv, t, D]`` and ``docs [B, t]`` or None."""

    k: torch.Tensor
    v: torch.Tensor
    docs: Optional[torch.Tensor]


@dataclass
class _Transfer:
    """Point-to-point operations in flight and the buffers they fill."""

    works: list
    received: list

    def wait(self) -> list:
        """Block until every operation is done; return the received tensors."""
        for work in self.works:
            work.wait()
        return self.received


class _Ring:
    """This rank's neighbours on the cp ring: send to ``rank + 1``, receive from ``rank - 1``.

    Ranks are relative to the cp group (which may be a sub-group of a bigger mesh); the
    point-to-point peers are their global ranks.
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def shift(self, tensors: Sequence[Optional[torch.Tensor]]) -> _Transfer:
        """Start sending ``tensors`` to the next rank and receiving the previous rank's.

        ``None`` entries stay ``None``; on a ring of one the tensors come straight back.
        """
        if self.size == 1:
            return _Transfer([], list(tensors))
        received = [None if t is None else torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors if t is not None]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in received if t is not None]
        return _Transfer(dist.batch_isend_irecv(ops), received)


@dataclass
class _Block:
    """The visible part of one step: local queries ``q`` attend held keys ``kv``."""

    q: slice
    kv: slice
    causal: bool


class _Piece(NamedTuple):
    """One kernel call: rows ``b`` of the batch, queries ``q`` attend keys ``kv`` (indices
    into the local shard and the held block)."""

    b: slice
    q: slice
    kv: slice
    causal: bool


def zigzag_block(step: int, rank: int, cp: int, local_len: int) -> _Block:
    """Which local queries see which held keys at ``step`` under the zigzag layout.

    Rank ``r`` holds chunks ``(r, 2cp-1-r)`` of queries; at step ``s`` it holds the keys
    of chunks ``(j, 2cp-1-j)`` with ``j = (r - s) mod cp``:

    * ``s = 0`` (``j = r``): all queries, all keys, causal (local order is global order);
    * ``j < r``: both query chunks follow chunk ``j`` and precede chunk ``2cp-1-j``:
      all queries see the first key chunk;
    * ``j > r``: only query chunk ``2cp-1-r`` follows both key chunks: the second query
      chunk sees all keys.

    Args:
        local_len: ``2 * chunk``, the length of a shard.
    """
    half = local_len // 2
    if step == 0:
        return _Block(slice(None), slice(None), causal=True)
    if (rank - step) % cp < rank:
        return _Block(slice(0, local_len), slice(0, half), causal=False)
    return _Block(slice(half, local_len), slice(0, local_len), causal=False)


def _runs(docs: torch.Tensor) -> dict[int, tuple[int, int]]:
    """``{document id: (start, end)}`` of a ``[T]`` row whose documents are contiguous runs.

    Raises:
        ValueError: a document id occurs in two separate runs.
    """
    ids, counts = torch.unique_consecutive(docs, return_counts=True)
    runs, start = {}, 0
    for doc, count in zip(ids.tolist(), counts.tolist()):
        if doc in runs:
            raise ValueError(f"document id {doc} occurs in two separate runs: packed documents must be contiguous")
        runs[doc] = (start, start + count)
        start += count
    return runs


def document_pieces(q_docs: torch.Tensor, k_docs: torch.Tensor, block: _Block) -> list[_Piece]:
    """Split a block pair into per-document kernel calls, so that no mask is ever built.

    Queries and keys are both in global order and documents are contiguous runs, so a
    document's queries and keys are one slice each. In a causal (diagonal) pair a
    document attends itself causally; otherwise every key precedes every query and a
    document's queries attend all its keys. Queries whose document has no key in the
    block are left out (absent from this step's merge).

    Args:
        q_docs: ``[B, Tq]`` document ids of the block's queries.
        k_docs: ``[B, Tk]`` document ids of the block's keys.
        block: the block (offsets of its queries and keys in the shard and held block).

    Returns:
        The pieces, with query/key offsets in shard / held-block coordinates.
    """
    q0, k0 = block.q.start or 0, block.kv.start or 0
    pieces = []
    for b in range(q_docs.shape[0]):
        k_runs = _runs(k_docs[b])
        for doc, (qa, qb) in _runs(q_docs[b]).items():
            if doc in k_runs:
                ka, kb = k_runs[doc]
                pieces.append(_Piece(slice(b, b + 1), slice(q0 + qa, q0 + qb), slice(k0 + ka, k0 + kb), block.causal))
    return pieces


def plan_block(
    step: int, ring: _Ring, q_docs: Optional[torch.Tensor], held: _KV, local_len: int
) -> list[_Piece]:
    """The kernel calls of ``step``: one when the block holds a single document (or no
    document ids are given), else one per document present in both queries and keys."""
    block = zigzag_block(step, ring.rank, ring.size, local_len)
    whole = [_Piece(slice(None), block.q, block.kv, block.causal)]
    if q_docs is None:
        return whole
    q_docs, k_docs = q_docs[:, block.q], held.docs[:, block.kv]
    docs = torch.cat([q_docs, k_docs], dim=1)
    if bool((docs == docs[:, :1]).all()):
        return whole
    return document_pieces(q_docs, k_docs, block)


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
           block_lse: torch.Tensor) -> None:
    """Fold a block's partial attention into the running result, in place, in fp32.

    ``lse' = log(exp(lse) + exp(lse_b))`` (as ``logaddexp``, i.e. ``max + log1p(exp(-|a-b|))``);
    ``out' = out * exp(lse - lse') + out_b * exp(lse_b - lse')``.
    A row absent from both (``lse = lse_b = -inf``) stays ``out = 0, lse = -inf``.

    Args:
        out: ``[B, H, Tq, D]`` float32 running output.
        lse: ``[B, H, Tq]`` float32 running log-sum-exp.
        block_out: ``[B, H, Tq, D]`` the block's output.
        block_lse: ``[B, H, Tq]`` float32 the block's log-sum-exp.
    """
    new_lse = torch.logaddexp(lse, block_lse)
    ref = new_lse.masked_fill(torch.isneginf(new_lse), 0.0)
    out.mul_(torch.exp(lse - ref)[..., None])
    out.add_(block_out.float() * torch.exp(block_lse - ref)[..., None])
    lse.copy_(new_lse)


def ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Optional[torch.Tensor], ring: _Ring
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out = merge over steps s of attention(q, kv block held at s)``.

    Args:
        q: ``[B, Hq, t, D]`` local queries; ``k, v``: ``[B, Hkv, t, D]`` local keys/values.
        docs: ``[B, t]`` local document ids or ``None``.

    Returns:
        ``out [B, Hq, t, D]`` (dtype of ``q``) and ``lse [B, Hq, t]`` float32.
    """
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    held = _KV(k, v, docs)
    for step in range(ring.size):
        incoming = ring.shift(held) if step + 1 < ring.size else None
        for p in plan_block(step, ring, docs, held, q.shape[2]):
            block_out, block_lse = block_attention(
                q[p.b, :, p.q], held.k[p.b, :, p.kv], held.v[p.b, :, p.kv], causal=p.causal)
            merge_(out[p.b, :, p.q], lse[p.b, :, p.q], block_out, block_lse)
        if incoming is not None:
            held = _KV(*incoming.wait())
    return out.to(q.dtype), lse


def ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    docs: Optional[torch.Tensor],
    ring: _Ring,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients through the ring; ``dK``/``dV`` travel back to their owners.

    ``dq = sum_s dq_s`` stays local. The ``dK``/``dV`` of the block held at step ``s``
    arrive from the previous rank (which held that block at step ``s - 1``), get this
    step's share added and leave for the next rank; after ``cp`` steps and one last hop
    each rank has the complete gradients of its own keys/values. Sums are in fp32.

    Args:
        dout: ``[B, Hq, t, D]``; ``q, k, v, docs`` as in :func:`ring_forward`.
        out, lse: what :func:`ring_forward` returned.

    Returns:
        ``dq [B, Hq, t, D]``, ``dk, dv [B, Hkv, t, D]``, all float32.
    """
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    held = _KV(k, v, docs)
    dkv_in: Optional[_Transfer] = None
    for step in range(ring.size):
        incoming = ring.shift(held) if step + 1 < ring.size else None
        pieces = plan_block(step, ring, docs, held, q.shape[2])
        grads = [
            block_attention_backward(
                dout[p.b, :, p.q], q[p.b, :, p.q], held.k[p.b, :, p.kv], held.v[p.b, :, p.kv],
                out[p.b, :, p.q], lse[p.b, :, p.q], causal=p.causal)
            for p in pieces
        ]
        if dkv_in is None:
            dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
            dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        else:
            dk, dv = dkv_in.wait()
        for p, (piece_dq, piece_dk, piece_dv) in zip(pieces, grads):
            dq[p.b, :, p.q] += piece_dq
            dk[p.b, :, p.kv] += piece_dk
            dv[p.b, :, p.kv] += piece_dv
        dkv_in = ring.shift((dk, dv))
        if incoming is not None:
            held = _KV(*incoming.wait())
    dk, dv = dkv_in.wait()
    return dq, dk, dv


class RingAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: :func:`ring_forward` forward, :func:`ring_backward` backward."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        document_ids: Optional[torch.Tensor],
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        """Shapes as in :meth:`RingAttention.forward`; saves ``out`` and ``lse`` for backward."""
        ring = _Ring(group)
        k, v = k.contiguous(), v.contiguous()
        out, lse = ring_forward(q, k, v, document_ids, ring)
        ctx.save_for_backward(q, k, v, out, lse, document_ids)
        ctx.ring = ring
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        """``dout [B, Hq, t, D]`` -> gradients of ``q, k, v`` in their dtypes."""
        q, k, v, out, lse, document_ids = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, document_ids, ctx.ring)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


class RingAttention(nn.Module):
    """Causal attention over a sequence sharded across the cp group in the zigzag layout.

    Drop-in replacement for :class:`omnilong.models.attention.CausalAttention`: same
    ``forward`` signature, but every tensor is this rank's zigzag shard
    (:func:`omnilong.parallel.sequence_sharding.shard_sequence`).

    Args:
        cp: the cp process group, or a 1-D device mesh (e.g. ``mesh["cp"]``).
    """

    def __init__(self, cp: Union[dist.ProcessGroup, DeviceMesh]):
        super().__init__()
        self.group = cp.get_group() if isinstance(cp, DeviceMesh) else cp

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        document_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            q: ``[B, Hq, t, D]`` local queries, ``t = T / cp`` (rotary already applied).
            k: ``[B, Hkv, t, D]`` local keys, ``Hq % Hkv == 0``.
            v: ``[B, Hkv, t, D]`` local values.
            document_ids: ``[B, t]`` local document ids, or ``None`` for one sequence per row.

        Returns:
            ``[B, Hq, t, D]`` attention output of the local queries.
        """
        if q.shape[2] % 2:
            raise ValueError(f"a zigzag shard has two equal chunks; got odd length {q.shape[2]}: "
                             "pad the full sequence with sequence_sharding.pad_batch first")
        return RingAttentionFunction.apply(q, k, v, document_ids, self.group)
