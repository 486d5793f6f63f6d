"""Ring attention on zigzag shards equals single-device attention on the full sequence.

Oracle: :class:`CausalAttention` on the unsharded sequence (autograd for the gradients);
the ring's output and the gradients of q, k, v are gathered from all cp ranks.
Tolerance: max abs diff <= 1e-5 in fp32. In bf16 the ring runs on bf16 inputs and is
compared with the fp32 oracle on the same (bf16-rounded) inputs: <= 2e-2 for the output,
<= 2e-2 * max|grad| for the gradients (bf16 has an 8-bit mantissa, eps = 7.8e-3).
All cases of one world size share one launch of gloo processes; at world size 4 one
case also runs on the "cp" dimension of a (dp=2, cp=2) mesh, whose groups are not the
world (group ranks differ from global ranks).
"""

from typing import Union

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from omnilong.models.attention import CausalAttention
from omnilong.parallel import (
    RingAttention,
    gather_sequence,
    pad_batch,
    pad_to_shardable,
    shard_sequence,
)
from omnilong.parallel.ring_attention import zigzag_block

CHUNK = 4  # tokens per zigzag chunk; a shard is two chunks
BATCH, HEAD_DIM = 2, 8

# name: (query heads, kv heads, packed documents, tokens short of a multiple of 2*cp, dtype)
CASES = {
    "causal": (4, 4, False, 0, torch.float32),
    "documents": (4, 4, True, 0, torch.float32),
    "gqa": (4, 2, True, 0, torch.float32),
    "gqa_causal": (6, 2, False, 0, torch.float32),
    "padding_documents": (4, 2, True, 3, torch.float32),
    "padding_causal": (4, 4, False, 1, torch.float32),
    "bf16_documents": (4, 2, True, 0, torch.bfloat16),
}


def packed_documents(seq_len: int) -> torch.Tensor:
    """``[2, seq_len]`` document ids. Row 0 starts documents exactly on chunk edges
    (CHUNK, 3 * CHUNK) and inside a chunk (CHUNK + 2); row 1 has a long document across
    several shards, then one from 3 * CHUNK, so that some block pairs see nothing."""
    starts = torch.zeros(2, seq_len, dtype=torch.long)
    starts[0, [CHUNK, CHUNK + 2, 3 * CHUNK]] = 1
    starts[1, 3 * CHUNK] = 1
    return starts.cumsum(-1)


def _max_errors(cp_group: Union[dist.ProcessGroup, DeviceMesh], hq: int, hkv: int,
                packed: bool, short: int, dtype: torch.dtype) -> dict[str, float]:
    """Run one case on this rank; return the max abs error of out, dq, dk, dv
    (of the real tokens; relative to max|grad| for bf16 gradients)."""
    group = cp_group.get_group() if isinstance(cp_group, DeviceMesh) else cp_group
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    seq_len = 2 * cp * CHUNK - short
    g = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, hq, seq_len, HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(BATCH, hkv, seq_len, HEAD_DIM, generator=g).to(dtype)
    v = torch.randn(BATCH, hkv, seq_len, HEAD_DIM, generator=g).to(dtype)
    dout = torch.randn(BATCH, hq, seq_len, HEAD_DIM, generator=g).to(dtype)
    docs = packed_documents(seq_len) if packed else None

    full = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref_out = CausalAttention()(*full, docs)
    ref_out.backward(dout.float())
    expected = [ref_out, *(x.grad for x in full)]

    local = [_shard(x, rank, cp).requires_grad_() for x in (q, k, v)]
    local_docs = None if docs is None else _shard_docs(docs, rank, cp)
    out = RingAttention(cp_group)(*local, local_docs)
    out.backward(_shard(dout, rank, cp))
    got = [gather_sequence(x.detach(), group, dim=2)[:, :, :seq_len] for x in
           (out, *(x.grad for x in local))]
    return {name: (a.float() - b).abs().max().item() / _scale(b, name, dtype)
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected)}


def _shard(x: torch.Tensor, rank: int, cp: int) -> torch.Tensor:
    """``[B, H, T, D]`` full -> this rank's zigzag shard, padded with zeros first."""
    return shard_sequence(pad_to_shardable(x, cp, dim=2), rank, cp, dim=2)


def _shard_docs(docs: torch.Tensor, rank: int, cp: int) -> torch.Tensor:
    """``[B, T]`` full -> this rank's shard; ``pad_batch`` gives padding a document of its own."""
    return shard_sequence(pad_batch({"document_ids": docs}, cp)["document_ids"], rank, cp)


def _scale(expected: torch.Tensor, name: str, dtype: torch.dtype) -> float:
    """bf16 gradients are compared relative to their largest entry; everything else absolute."""
    return expected.abs().max().item() if dtype == torch.bfloat16 and name != "out" else 1.0


def _run_cases(rank: int, world_size: int) -> dict[str, dict[str, float]]:
    errors = {name: _max_errors(dist.group.WORLD, *case) for name, case in CASES.items()}
    if world_size == 4:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
        errors["gqa_on_cp_submesh"] = _max_errors(mesh["cp"], *CASES["gqa"])
    return errors


@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_attention_matches_full_attention(run_distributed, world_size):
    errors = run_distributed(_run_cases, world_size)
    for rank_errors in errors:
        for name, per_tensor in rank_errors.items():
            tol = 2e-2 if name.startswith("bf16") else 1e-5
            assert max(per_tensor.values()) <= tol, (name, per_tensor)


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
