"""Ring attention over the context-parallel (cp) group, for zigzag-sharded sequences.

Every cp rank keeps its query shard; the key/value shards travel the ring, rank ``r``
sending to ``r + 1`` and receiving from ``r - 1``, so at step ``s`` rank ``r`` holds the
key/value shard of rank ``(r - s) mod cp``. Each step attends the local queries to the
held block while the next block is already in flight, and merges the partial result
with the log-sum-exp rule. The backward makes the same trip and carries the sum of each
block's ``dK``/``dV`` shares with it, one hop behind and in the inputs' dtype, until it is
home (:func:`ring_backward`).

The zigzag layout (:mod:`.sequence_sharding`) makes every step's block pair either
diagonal, fully visible or fully hidden chunk by chunk (:func:`zigzag_block`). Packed
documents cut a block pair into per-document pieces; all pieces of a step are one
call of the attention entry point (:func:`omnilong.models.attention.attention_with_lse`,
:func:`~omnilong.models.attention.attention_backward`). Which rows each step
attends is planned once per batch (:func:`plan_ring`, :meth:`RingAttention.plan`), so the
ring itself never reads a tensor back to the host.

Tensors are in the packed layout of varlen kernels: a shard of ``B`` rows of ``t``
tokens is ``[B * t, H, D]``.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from omnilong.models.attention import attention_backward, attention_with_lse
from omnilong.models.varlen_attention import VarlenSegments, pack_tokens, runs_of_equal_ids, unpack_tokens

Rows = slice | torch.Tensor  # packed rows: a contiguous range, or an index tensor


class Transfer(Protocol):
    def wait(self) -> list[torch.Tensor | None]:
        """Block until the exchange is done; return the tensors received."""


class RingComm(Protocol):
    """A rank's place on the ring: ``rank`` of ``size``, and the exchange with its neighbours."""

    rank: int
    size: int

    def shift(self, tensors: Sequence[torch.Tensor | None]) -> Transfer:
        """Start sending ``tensors`` to the next rank and receiving the previous rank's."""


@dataclass
class _P2PTransfer:
    works: list
    received: list

    def wait(self) -> list:
        for work in self.works:
            work.wait()
        return self.received


class ProcessGroupRing:
    """The ring of a cp process group: send to ``rank + 1``, receive from ``rank - 1``.

    Ranks are relative to the cp group (which may be a sub-group of a bigger mesh); the
    point-to-point peers are their global ranks.
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def shift(self, tensors: Sequence[torch.Tensor | None]) -> _P2PTransfer:
        """``None`` entries stay ``None``; on a ring of one the tensors come straight back."""
        if self.size == 1:
            return _P2PTransfer([], list(tensors))
        received = [None if t is None else torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors if t is not None]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in received if t is not None]
        return _P2PTransfer(dist.batch_isend_irecv(ops), received)


class _Block(NamedTuple):
    """The visible part of one step: local queries ``q`` attend held keys ``kv``."""

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
        return _Block(slice(0, local_len), slice(0, local_len), causal=True)
    if (rank - step) % cp < rank:
        return _Block(slice(0, local_len), slice(0, half), causal=False)
    return _Block(slice(half, local_len), slice(0, local_len), causal=False)


@dataclass(frozen=True)
class RingStep:
    """The kernel call of one ring step: packed local query rows ``q_rows`` attend packed
    held key rows ``k_rows`` in ``segments`` (one per document present in both)."""

    q_rows: Rows
    k_rows: Rows
    segments: VarlenSegments


def _block_pieces(q_ids: list[int] | None, k_ids: list[int] | None, block: _Block) -> list[tuple[int, int, int, int]]:
    """``(q_start, q_end, k_start, k_end)`` in shard / held-block offsets of one row's block pair.

    Without document ids the block is one piece. With them, queries and keys are both in
    global order and documents are contiguous runs, so a document's queries and keys are
    one range each: in a diagonal pair a document attends itself causally; otherwise every
    key precedes every query and a document's queries attend all its keys. Queries whose
    document has no key in the block are left out (absent from this step's merge).

    Raises:
        ValueError: a document id occurs in two separate runs.
    """
    if q_ids is None:
        return [(block.q.start, block.q.stop, block.kv.start, block.kv.stop)]
    k_runs = _runs_by_id(k_ids[block.kv])
    pieces = []
    for doc, (qa, qb) in _runs_by_id(q_ids[block.q]).items():
        if doc in k_runs:
            ka, kb = k_runs[doc]
            pieces.append((block.q.start + qa, block.q.start + qb, block.kv.start + ka, block.kv.start + kb))
    return pieces


def _runs_by_id(ids: list[int]) -> dict[int, tuple[int, int]]:
    runs: dict[int, tuple[int, int]] = {}
    for doc, start, end in runs_of_equal_ids(ids):
        if doc in runs:
            raise ValueError(f"document id {doc} occurs in two separate runs: packed documents must be contiguous")
        runs[doc] = (start, end)
    return runs


def _rows(ranges: list[tuple[int, int]], device: torch.device) -> Rows:
    """Packed rows covering ``ranges`` in order: a slice when they are contiguous."""
    if all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])):
        return slice(ranges[0][0], ranges[-1][1])
    index = torch.cat([torch.arange(lo, hi) for lo, hi in ranges])
    return index.to(device, non_blocking=True)


def plan_ring(
    rank: int,
    cp: int,
    shard_ids: Sequence[list[list[int]]] | None,
    batch: int,
    local_len: int,
    device: torch.device,
) -> list[RingStep | None]:
    """The kernel call of every ring step of ``rank`` (``None`` for a step with nothing visible).

    Args:
        rank, cp: this rank and the ring size.
        shard_ids: ``shard_ids[r][b]`` the document ids of rank ``r``'s shard of row ``b``
            (host lists), or ``None`` for one sequence per row.
        batch, local_len: the shard is ``batch`` rows of ``local_len`` tokens.
        device: where the varlen lengths and row indices go.
    """
    steps: list[RingStep | None] = []
    for step in range(cp):
        block = zigzag_block(step, rank, cp, local_len)
        held = (rank - step) % cp
        q_ranges, k_ranges, q_lengths, k_lengths = [], [], [], []
        for b in range(batch):
            q_ids = None if shard_ids is None else shard_ids[rank][b]
            k_ids = None if shard_ids is None else shard_ids[held][b]
            for qa, qb, ka, kb in _block_pieces(q_ids, k_ids, block):
                q_ranges.append((b * local_len + qa, b * local_len + qb))
                k_ranges.append((b * local_len + ka, b * local_len + kb))
                q_lengths.append(qb - qa)
                k_lengths.append(kb - ka)
        if not q_ranges:
            steps.append(None)
            continue
        segments = VarlenSegments.from_lengths(q_lengths, k_lengths, block.causal, device)
        steps.append(RingStep(_rows(q_ranges, device), _rows(k_ranges, device), segments))
    return steps


def _take(x: torch.Tensor, rows: Rows, dim: int = 0) -> torch.Tensor:
    if isinstance(rows, slice):
        return x[(slice(None),) * dim + (rows,)]
    return x.index_select(dim, rows)


def _put(x: torch.Tensor, rows: Rows, value: torch.Tensor, dim: int = 0) -> None:
    if isinstance(rows, slice):
        x[(slice(None),) * dim + (rows,)] = value
    else:
        x.index_copy_(dim, rows, value)


def _add(x: torch.Tensor, rows: Rows, value: torch.Tensor) -> None:
    if isinstance(rows, slice):
        x[rows] += value
    else:
        x.index_add_(0, rows, value.to(x.dtype))


def merge(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a block's partial attention into a running result, in fp32.

    ``lse' = log(exp(lse) + exp(lse_b))`` (as ``logaddexp``);
    ``out' = out * exp(lse - lse') + out_b * exp(lse_b - lse')``.
    A row absent from both (``lse = lse_b = -inf``) stays ``out = 0, lse = -inf``.

    Args:
        out: ``[N, H, D]`` float32 running output.
        lse: ``[H, N]`` float32 running log-sum-exp.
        block_out: ``[N, H, D]`` the block's output.
        block_lse: ``[H, N]`` float32 the block's log-sum-exp.

    Returns:
        The merged ``(out, lse)``.
    """
    new_lse = torch.logaddexp(lse, block_lse)
    ref = new_lse.masked_fill(torch.isneginf(new_lse), 0.0)
    weight, block_weight = torch.exp(lse - ref).T[..., None], torch.exp(block_lse - ref).T[..., None]  # [N, H, 1]
    return out * weight + block_out.float() * block_weight, new_lse


def ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, steps: list[RingStep | None], ring: RingComm
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out = merge over steps s of attention(q, kv block held at s)``.

    Args:
        q: ``[N, Hq, D]`` local queries; ``k, v``: ``[N, Hkv, D]`` local keys/values
            (packed: ``N = B * t``).
        steps: :func:`plan_ring` of this rank.

    Returns:
        ``out [N, Hq, D]`` (dtype of ``q``) and ``lse [Hq, N]`` float32.
    """
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    held = (k, v)
    for index, step in enumerate(steps):
        incoming = ring.shift(held) if index + 1 < ring.size else None
        if step is not None:
            block_out, block_lse = attention_with_lse(
                _take(q, step.q_rows), _take(held[0], step.k_rows), _take(held[1], step.k_rows), step.segments
            )
            merged_out, merged_lse = merge(
                _take(out, step.q_rows), _take(lse, step.q_rows, dim=1), block_out, block_lse
            )
            _put(out, step.q_rows, merged_out)
            _put(lse, step.q_rows, merged_lse, dim=1)
        if incoming is not None:
            held = tuple(incoming.wait())
    return out.to(q.dtype), lse


def ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    steps: list[RingStep | None],
    ring: RingComm,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients through the ring; the ``dK``/``dV`` of each block travel back to its owner.

    ``dq = sum_s dq_s`` stays local, in fp32. A block's ``dK``/``dV`` are the sum of the
    shares of the ranks that hold it in turn. The owner's share (step 0) stays home; the
    holder at step 1 starts the travelling sum, each later holder adds its share and passes
    the sum on, and the holder at step ``cp - 1`` sends it home, where the owner's share is
    added in fp32: ``cp - 1`` hops. The sum travels in the inputs' dtype (half the bytes of
    fp32 for bf16): a hop adds one share in place, in fp32 arithmetic rounded once to that
    dtype, so a bf16 sum is rounded at most ``cp - 2`` times more than its bf16 shares
    (measured: within the ring tests' bf16 tolerance for cp up to 32).

    Args:
        dout: ``[N, Hq, D]``; ``q, k, v, steps`` as in :func:`ring_forward`.
        out, lse: what :func:`ring_forward` returned.

    Returns:
        ``dq [N, Hq, D]``, ``dk, dv [N, Hkv, D]``, all float32.
    """
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    held = (k, v)
    home: tuple[Rows, torch.Tensor, torch.Tensor] | None = None  # (key rows, dk, dv) of the step-0 share
    travelling: Transfer | None = None  # the sum of the block held at the next step, on its way here
    for index, step in enumerate(steps):
        incoming = ring.shift(held) if index + 1 < ring.size else None
        share = None
        if step is not None:
            dq_step, dk_step, dv_step = attention_backward(
                _take(dout, step.q_rows),
                _take(q, step.q_rows),
                _take(held[0], step.k_rows),
                _take(held[1], step.k_rows),
                _take(out, step.q_rows),
                _take(lse, step.q_rows, dim=1).contiguous(),
                step.segments,
            )
            _add(dq, step.q_rows, dq_step)
            share = (step.k_rows, dk_step, dv_step)
        if index == 0:
            home = share
        else:
            dkv = _zero_grads(k, v, k.dtype) if travelling is None else travelling.wait()
            if share is not None:
                _add(dkv[0], share[0], share[1])
                _add(dkv[1], share[0], share[2])
            travelling = ring.shift(dkv)
        if incoming is not None:
            held = tuple(incoming.wait())
    dk, dv = _zero_grads(k, v, torch.float32) if travelling is None else (t.float() for t in travelling.wait())
    if home is not None:
        _add(dk, home[0], home[1])
        _add(dv, home[0], home[2])
    return dq, dk, dv


def _zero_grads(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.zeros(k.shape, dtype=dtype, device=k.device), torch.zeros(v.shape, dtype=dtype, device=v.device)]


class RingAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: :func:`ring_forward` forward, :func:`ring_backward` backward."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        steps: list[RingStep | None],
        ring: RingComm,
    ) -> torch.Tensor:
        """Packed ``q [N, Hq, D]``, ``k, v [N, Hkv, D]`` -> ``out [N, Hq, D]``."""
        k, v = k.contiguous(), v.contiguous()
        out, lse = ring_forward(q, k, v, steps, ring)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.steps, ctx.ring = steps, ring
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """``dout [N, Hq, D]`` -> gradients of ``q, k, v`` in their dtypes."""
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.steps, ctx.ring)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


class RingAttention(nn.Module):
    """Causal attention over a sequence sharded across the cp group in the zigzag layout.

    Drop-in replacement for :class:`omnilong.models.attention.CausalAttention`: same
    ``plan`` / ``forward`` interface, but every tensor is this rank's zigzag shard
    (:func:`omnilong.parallel.sequence_sharding.shard_sequence`).

    Args:
        cp: the cp process group, or a 1-D device mesh (e.g. ``mesh["cp"]``).
    """

    def __init__(self, cp: dist.ProcessGroup | DeviceMesh):
        super().__init__()
        self.group = cp.get_group() if isinstance(cp, DeviceMesh) else cp
        self.ring = ProcessGroupRing(self.group)

    def plan(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None) -> list[RingStep | None]:
        """Every ring step's kernel call for this batch (:func:`plan_ring`). With packed
        documents, the document ids of all cp ranks are all-gathered (one collective per
        batch) and read back to the host once.

        Args:
            input_ids: ``[B, t]`` this rank's shard (for its shape and device).
            document_ids: ``[B, t]`` this rank's shard of the document ids, or ``None``.
        """
        batch, local_len = input_ids.shape
        if local_len % 2:
            raise ValueError(
                f"a zigzag shard has two equal chunks; got odd length {local_len}: "
                "pad the full sequence with sequence_sharding.pad_batch first"
            )
        shard_ids = None
        if document_ids is not None:
            shards = [torch.empty_like(document_ids) for _ in range(self.ring.size)]
            dist.all_gather(shards, document_ids.contiguous(), group=self.group)
            shard_ids = torch.stack(shards).tolist()
        return plan_ring(self.ring.rank, self.ring.size, shard_ids, batch, local_len, input_ids.device)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plan: list[RingStep | None],
    ) -> torch.Tensor:
        """
        Args:
            q: ``[B, Hq, t, D]`` local queries, ``t = T / cp`` (rotary already applied).
            k: ``[B, Hkv, t, D]`` local keys, ``Hq % Hkv == 0``.
            v: ``[B, Hkv, t, D]`` local values.
            plan: :meth:`plan` of the batch.

        Returns:
            ``[B, Hq, t, D]`` attention output of the local queries.
        """
        out = RingAttentionFunction.apply(pack_tokens(q), pack_tokens(k), pack_tokens(v), plan, self.ring)
        return unpack_tokens(out, q.shape[0])  # [B, Hq, t, D]
