"""Ring attention on zigzag shards equals causal attention on the full sequence.

Oracle: attention with an explicit ``T x T`` mask (causal and same document) on the
unsharded sequence, in fp32 on the CPU math path (the ``masked_attention`` fixture),
with autograd for the gradients; the ring's output and the gradients of q, k, v are
unsharded from all cp ranks and compared on the real (unpadded) tokens.

Tolerances: max abs diff <= 1e-5 in fp32. bf16 runs the ring on bf16 inputs and compares
with the fp32 oracle on the same (bf16-rounded) inputs: <= 2e-2 for the output,
<= 2e-2 * max|grad| for the gradients (bf16 has an 8-bit mantissa, eps = 7.8e-3). The
dK/dV sums travel the ring in the inputs' dtype, rounded at every hop, so the local ring
also runs cp = 8 (six roundings more than the shares' own).

The ring runs two ways with the same code: as virtual ranks in one process
(:func:`run_local_ring`; on CPU always, on CUDA when present, where the kernel is flash
attention's varlen op) and as real gloo processes through :class:`RingAttention`.
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from omnilong.models.varlen_attention import pack_tokens, unpack_tokens
from omnilong.parallel import (
    RingAttention,
    gather_sequence,
    pad_batch,
    pad_to_shardable,
    plan_ring,
    ring_backward,
    ring_forward,
    run_local_ring,
    shard_sequence,
    unshard_sequence,
)
from omnilong.parallel.ring_attention import zigzag_block

CHUNK = 4  # tokens per zigzag chunk; a shard is two chunks
BATCH, HEAD_DIM = 2, 8

# name: (query heads, kv heads, packed documents, tokens short of a multiple of 2*cp, dtype)
CASES = {
    "causal": (4, 4, False, 0, torch.float32),
    "documents": (4, 4, True, 0, torch.float32),
    "gqa_28_4_documents": (28, 4, True, 0, torch.float32),
    "gqa_causal": (6, 2, False, 0, torch.float32),
    "padding_documents": (4, 2, True, 3, torch.float32),
    "padding_causal": (4, 4, False, 1, torch.float32),
    "bf16_documents": (4, 2, True, 0, torch.bfloat16),
}

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def packed_documents(seq_len: int) -> torch.Tensor:
    """``[2, seq_len]`` document ids. Row 0 starts documents exactly on chunk edges
    (CHUNK, 3 * CHUNK) and inside a chunk (CHUNK + 2); row 1 has a long document across
    several shards, then one from 3 * CHUNK, so that some block pairs see nothing."""
    starts = torch.zeros(2, seq_len, dtype=torch.long)
    starts[0, [CHUNK, CHUNK + 2, 3 * CHUNK]] = 1
    starts[1, 3 * CHUNK] = 1
    return starts.cumsum(-1)


def _case_tensors(cp: int, hq: int, hkv: int, packed: bool, short: int, dtype: torch.dtype):
    """Inputs of one case (full sequence) and the oracle's output and gradients."""
    seq_len = 2 * cp * CHUNK - short
    g = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, hq, seq_len, HEAD_DIM, generator=g).to(dtype)
    k, v = (torch.randn(BATCH, hkv, seq_len, HEAD_DIM, generator=g).to(dtype) for _ in range(2))
    dout = torch.randn(BATCH, hq, seq_len, HEAD_DIM, generator=g).to(dtype)
    docs = packed_documents(seq_len) if packed else None
    return q, k, v, dout, docs


def _oracle(masked_attention, q, k, v, dout, docs):
    full = [x.detach().float().requires_grad_() for x in (q, k, v)]
    out = masked_attention(*full, docs)
    out.backward(dout.float())
    return [out.detach(), *(x.grad for x in full)]


def _shard(x: torch.Tensor, rank: int, cp: int) -> torch.Tensor:
    """``[B, H, T, D]`` full -> this rank's zigzag shard, padded with zeros first."""
    return shard_sequence(pad_to_shardable(x, cp, dim=2), rank, cp, dim=2)


def _shard_docs(docs: torch.Tensor, rank: int, cp: int) -> torch.Tensor:
    """``[B, T]`` full -> this rank's shard; ``pad_batch`` gives padding a document of its own."""
    return shard_sequence(pad_batch({"document_ids": docs}, cp)["document_ids"], rank, cp)


def _errors(got: list[torch.Tensor], expected: list[torch.Tensor], dtype: torch.dtype) -> dict[str, float]:
    """Max abs error per tensor (bf16 gradients relative to their largest entry)."""
    errors = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        scale = b.abs().max().item() if dtype == torch.bfloat16 and name != "out" else 1.0
        errors[name] = (a.float().cpu() - b).abs().max().item() / scale
    return errors


def _tolerance(dtype: torch.dtype) -> float:
    return 2e-2 if dtype == torch.bfloat16 else 1e-5


def _local_ring_errors(masked_attention, cp: int, case: tuple, device: str) -> dict[str, float]:
    """One case on a ring of ``cp`` virtual ranks in this process."""
    hq, hkv, packed, short, dtype = case
    q, k, v, dout, docs = _case_tensors(cp, *case)
    expected = _oracle(masked_attention, q, k, v, dout, docs)
    shard_ids = None if docs is None else [_shard_docs(docs, r, cp).tolist() for r in range(cp)]
    local_len = 2 * CHUNK

    def rank_fn(ring):
        steps = plan_ring(ring.rank, cp, shard_ids, BATCH, local_len, torch.device(device))
        lq, lk, lv, ldout = (pack_tokens(_shard(x, ring.rank, cp)).to(device) for x in (q, k, v, dout))
        out, lse = ring_forward(lq, lk, lv, steps, ring)
        return (out, *ring_backward(ldout, lq, lk, lv, out, lse, steps, ring))

    per_rank = run_local_ring(cp, rank_fn)
    seq_len = q.shape[2]
    got = [unshard_sequence([unpack_tokens(r[i], BATCH) for r in per_rank], dim=2)[:, :, :seq_len] for i in range(4)]
    return _errors(got, expected, dtype)


@pytest.mark.parametrize("cp", [2, 4, 8])
@pytest.mark.parametrize("name", list(CASES))
def test_local_ring_matches_masked_attention(masked_attention, cp, name):
    errors = _local_ring_errors(masked_attention, cp, CASES[name], "cpu")
    assert max(errors.values()) <= _tolerance(CASES[name][-1]), errors


@CUDA
@pytest.mark.parametrize("cp", [2, 4, 8])
@pytest.mark.parametrize("name", ["causal", "documents", "gqa_28_4_documents", "gqa_causal", "padding_documents"])
def test_local_ring_on_cuda_matches_masked_attention(masked_attention, cp, name):
    """The CUDA kernels (flash varlen, bf16) forward and backward."""
    hq, hkv, packed, short, _ = CASES[name]
    errors = _local_ring_errors(masked_attention, cp, (hq, hkv, packed, short, torch.bfloat16), "cuda")
    assert max(errors.values()) <= _tolerance(torch.bfloat16), errors


class _RecordingRing:
    """A ring that records the dtype of every tensor it sends, phase by phase."""

    def __init__(self, ring):
        self.ring, self.rank, self.size = ring, ring.rank, ring.size
        self.sent: dict[str, list[list[torch.dtype]]] = {}
        self.phase = ""

    def shift(self, tensors):
        self.sent.setdefault(self.phase, []).append([t.dtype for t in tensors])
        return self.ring.shift(tensors)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_what_travels_the_ring_is_in_the_inputs_dtype(cp, dtype):
    """Forward: ``cp - 1`` hops of the k/v blocks. Backward: ``cp - 1`` hops of the k/v blocks
    and ``cp - 1`` of the dK/dV sums (the owner's own share never leaves). Everything sent is
    in the inputs' dtype: bf16 dK/dV sums are half the bytes of fp32 ones."""

    def rank_fn(ring):
        ring = _RecordingRing(ring)
        steps = plan_ring(ring.rank, cp, None, 1, 2 * CHUNK, torch.device("cpu"))
        g = torch.Generator().manual_seed(ring.rank)
        q, k, v = (torch.randn(2 * CHUNK, h, HEAD_DIM, generator=g).to(dtype) for h in (4, 2, 2))
        ring.phase = "forward"
        out, lse = ring_forward(q, k, v, steps, ring)
        ring.phase = "backward"
        ring_backward(torch.ones_like(out), q, k, v, out, lse, steps, ring)
        return ring.sent

    for sent in run_local_ring(cp, rank_fn):
        assert sent.get("forward", []) == [[dtype, dtype]] * (cp - 1)
        assert sent.get("backward", []) == [[dtype, dtype]] * (2 * (cp - 1))


def _distributed_errors(masked_attention, cp_group: dist.ProcessGroup | DeviceMesh, case: tuple) -> dict[str, float]:
    """One case through :class:`RingAttention` (plan + autograd) on this gloo rank."""
    group = cp_group.get_group() if isinstance(cp_group, DeviceMesh) else cp_group
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    q, k, v, dout, docs = _case_tensors(cp, *case)
    expected = _oracle(masked_attention, q, k, v, dout, docs)
    local = [_shard(x, rank, cp).requires_grad_() for x in (q, k, v)]
    local_docs = None if docs is None else _shard_docs(docs, rank, cp)
    attention = RingAttention(cp_group)
    out = attention(*local, attention.plan(local[0][:, 0, :, 0], local_docs))
    out.backward(_shard(dout, rank, cp))
    got = [gather_sequence(x.detach(), group, dim=2)[:, :, : q.shape[2]] for x in (out, *(x.grad for x in local))]
    return _errors(got, expected, case[-1])


def _run_cases(rank: int, world_size: int, masked_attention) -> dict[str, dict[str, float]]:
    names = ("causal", "gqa_28_4_documents", "padding_documents", "bf16_documents")
    errors = {name: _distributed_errors(masked_attention, dist.group.WORLD, CASES[name]) for name in names}
    if world_size == 4:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
        errors["documents_on_cp_submesh"] = _distributed_errors(
            masked_attention, mesh["cp"], CASES["padding_documents"]
        )
    return errors


@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_attention_processes_match_masked_attention(run_distributed, masked_attention, world_size):
    """Real processes, and at world size 4 the "cp" dimension of a (dp=2, cp=2) mesh,
    whose groups are not the world (group ranks differ from global ranks)."""
    for rank_errors in run_distributed(_run_cases, world_size, masked_attention):
        for name, per_tensor in rank_errors.items():
            assert max(per_tensor.values()) <= _tolerance(CASES.get(name, CASES["causal"])[-1]), (name, per_tensor)


def test_documents_split_across_runs_are_refused():
    shard_ids = [[[0, 0, 1, 1, 0, 0, 2, 2]], [[2, 2, 2, 2, 3, 3, 3, 3]]]
    with pytest.raises(ValueError, match="document id 0 occurs in two separate runs"):
        plan_ring(0, 2, shard_ids, 1, 8, torch.device("cpu"))


def test_plan_of_one_document_per_row_is_one_contiguous_call_per_step():
    """No documents: each step attends contiguous rows (no gather), one segment per row."""
    steps = plan_ring(0, 2, None, 1, 8, torch.device("cpu"))
    assert [(s.q_rows, s.k_rows, s.segments.bounds, s.segments.causal) for s in steps] == [
        (slice(0, 8), slice(0, 8), ((0, 8, 0, 8),), True),
        (slice(4, 8), slice(0, 8), ((0, 4, 0, 8),), False),
    ]


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_zigzag_blocks_cover_exactly_the_causal_pairs(cp):
    """Over all ring steps, the blocks attend every (query, key) pair with key <= query,
    each once, and no other pair."""
    seq_len = 2 * cp * CHUNK
    for rank in range(cp):
        q_pos = _positions(seq_len, rank, cp)
        covered = torch.zeros(seq_len, seq_len, dtype=torch.long)
        for step in range(cp):
            k_pos = _positions(seq_len, (rank - step) % cp, cp)
            block = zigzag_block(step, rank, cp, len(q_pos))
            qs, ks = q_pos[block.q], k_pos[block.kv]
            visible = torch.ones(len(qs), len(ks), dtype=torch.bool)
            if block.causal:
                visible = visible.tril()
            covered[qs[:, None], ks[None, :]] += visible.long()
        causal = torch.ones(seq_len, seq_len, dtype=torch.long).tril()
        assert torch.equal(covered[q_pos], causal[q_pos])


def _positions(seq_len: int, rank: int, cp: int) -> torch.Tensor:
    return shard_sequence(torch.arange(seq_len), rank, cp)
