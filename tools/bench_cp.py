"""Context-parallel benchmarks, measured side by side in one run.

    python tools/bench_cp.py [--parts balance memory] [--seq-len T]

Parts (each a function registered in ``PARTS``):

* ``balance``: causal attention work per cp rank, i.e. the number of attended
  (query, key) pairs, for the zigzag and the contiguous layouts at cp = 2, 4, 8.
  Pure arithmetic on the layouts of ``omnilong.parallel.sequence_sharding``: a query at
  global position ``p`` attends ``p + 1`` keys. The imbalance ``max / mean`` bounds the
  speed-up lost to the slowest rank; zigzag should be <= 1.05.

* ``memory``: peak activation memory per rank of one training step (forward and
  backward of the loss, no optimizer step) at cp = 1 and cp = 2, each configuration in
  fresh processes (gloo, CPU, fp32), built as the recipe builds it: model on the meta
  device, ring attention (cp > 1), activation checkpointing of every decoder layer,
  FSDP2 over the cp ranks, weights loaded, one packed row of a few documents sharded
  with ``shard_batch_for_cp``, ``ChunkedLinearCrossEntropy`` on the final hidden states.
  After one short warm-up step (one-time allocations), each rank writes "5" to
  ``/proc/self/clear_refs`` (VmHWM := VmRSS), reads VmRSS as the baseline (model, loss
  and batch exist, no gradients), runs the step and reports ``VmHWM - baseline``
  (glibc's mmap threshold fixed, see :func:`measure_step_memory`).
  Target: cp = 2 at most 0.6x the cp = 1 figure. ``--documents`` sets the relative
  document lengths of the row (``--documents 1``: one document, no document masking).

``--seq-len`` defaults to 131072 for ``balance`` and 32768 for ``memory``.
"""

import argparse
import os
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from omnilong.constants import IGNORE_INDEX
from omnilong.distributed import available_cores
from omnilong.documents import positions_within_documents
from omnilong.loss import ChunkedLinearCrossEntropy
from omnilong.metrics import host_peak_memory, reset_host_peak_memory
from omnilong.models.qwen2_5_vl import Qwen2_5_VLTextArgs, qwen2_5_vl
from omnilong.models.qwen2_5_vl.parallelize import apply_context_parallel
from omnilong.parallel.context_parallel import shard_batch_for_cp
from omnilong.parallel.fsdp import apply_activation_checkpointing, apply_fsdp
from omnilong.parallel.mesh import ParallelDims, ParallelMeshes, build_mesh
from omnilong.parallel.sequence_sharding import contiguous_positions, zigzag_positions

BALANCE_SEQ_LEN = 131072
MEMORY_SEQ_LEN = 32768
WARMUP_SEQ_LEN = 512
#: Tiny Qwen2.5-VL-shaped language model of the memory part (text only, fp32).
MODEL_ARGS = Qwen2_5_VLTextArgs(
    vocab_size=1024,
    dim=256,
    n_layers=4,
    n_heads=8,
    n_kv_heads=2,
    hidden_dim=1024,
    mrope_section=[4, 6, 6],
    image_token_id=None,
    video_token_id=None,
    vision_start_token_id=None,
    vision_end_token_id=None,
)
#: Default relative lengths of the documents packed into the row of the memory part.
DOCUMENT_SHARES = [3, 2, 2, 1]

LAYOUTS: dict[str, Callable[[int, int, int], torch.Tensor]] = {
    "zigzag": zigzag_positions,
    "contiguous": contiguous_positions,
}


def causal_pairs_per_rank(layout: Callable[[int, int, int], torch.Tensor], seq_len: int, cp: int) -> list[int]:
    """Attended (query, key) pairs of each rank: ``sum over held positions p of (p + 1)``."""
    return [int((layout(seq_len, rank, cp) + 1).sum()) for rank in range(cp)]


def attention_balance(args: argparse.Namespace) -> None:
    """Print max / mean causal work per rank for each layout and cp size."""
    seq_len = args.seq_len or BALANCE_SEQ_LEN
    print(f"causal attention work per rank (attended query-key pairs), T = {seq_len}")
    print(f"{'layout':<11} {'cp':>3} {'max':>16} {'mean':>16} {'max/mean':>9}")
    for cp in (2, 4, 8):
        for name, layout in LAYOUTS.items():
            work = causal_pairs_per_rank(layout, seq_len, cp)
            mean = sum(work) / cp
            print(f"{name:<11} {cp:>3} {max(work):>16,} {mean:>16,.0f} {max(work) / mean:>9.3f}")


def packed_row(seq_len: int, vocab_size: int, shares: list[int]) -> dict[str, torch.Tensor]:
    """One ``[1, seq_len]`` row of random tokens packing documents of relative lengths
    ``shares``, as ``PackedTextDataset`` gives it: labels are the next token of the same
    document (the last token of each document predicts nothing), positions restart at
    each document."""
    bounds = [seq_len * sum(shares[:i]) // sum(shares) for i in range(len(shares) + 1)]
    lengths = torch.tensor(bounds).diff()
    document_ids = torch.repeat_interleave(torch.arange(len(shares)), lengths)
    input_ids = torch.randint(vocab_size, (seq_len,), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:-1] = input_ids[1:]
    labels[torch.tensor(bounds[1:]) - 1] = IGNORE_INDEX
    row = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": positions_within_documents(document_ids),
        "document_ids": document_ids,
    }
    return {key: x[None] for key, x in row.items()}


def build_model(meshes: ParallelMeshes, cp: int) -> nn.Module:
    """``MODEL_ARGS``'s model as the recipe builds it: on the meta device, ring attention
    when ``cp > 1``, activation checkpointing, FSDP2, then the weights of a seeded random
    reference model loaded into the shards."""
    with torch.device("meta"):
        model = qwen2_5_vl(MODEL_ARGS)
    if cp > 1:
        apply_context_parallel(model, meshes.cp)
    apply_activation_checkpointing(model)
    apply_fsdp(model, meshes)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    set_model_state_dict(model, qwen2_5_vl(MODEL_ARGS).state_dict(), options=StateDictOptions(full_state_dict=True))
    return model


def rank_batch(seq_len: int, shares: list[int], meshes: ParallelMeshes, cp: int) -> dict[str, torch.Tensor]:
    """This rank's share of a :func:`packed_row`: the whole row at cp = 1, its zigzag shard else."""
    row = packed_row(seq_len, MODEL_ARGS.vocab_size, shares)
    return shard_batch_for_cp(row, meshes.cp, pad_token_id=0) if cp > 1 else row


def train_step(model: nn.Module, loss_fn: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Forward and backward of the recipe's loss: summed token loss over the all-reduced
    count of trained tokens; gradients are freed afterwards."""
    batch = dict(batch)
    labels = batch.pop("labels")
    global_tokens = (labels != IGNORE_INDEX).sum().double()
    dist.all_reduce(global_tokens)
    hidden = model(**batch, return_hidden=True)
    loss_sum, _ = loss_fn(hidden, model.output.weight, labels)
    (loss_sum / global_tokens.float()).backward()
    model.zero_grad(set_to_none=True)


def _memory_rank(rank: int, cp: int, seq_len: int, shares: list[int], port: int, results: mp.SimpleQueue) -> None:
    """One rank of :func:`measure_step_memory`: puts ``(rank, peak extra MiB, seconds)``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(cp))
    torch.set_num_threads(max(1, available_cores() // cp))
    dist.init_process_group("gloo")
    meshes = build_mesh(ParallelDims.resolve(cp, cp=cp), "cpu")
    model = build_model(meshes, cp)
    loss_fn = ChunkedLinearCrossEntropy(reduction="sum")
    train_step(model, loss_fn, rank_batch(WARMUP_SEQ_LEN, shares, meshes, cp))
    batch = rank_batch(seq_len, shares, meshes, cp)
    baseline = reset_host_peak_memory()
    start = time.perf_counter()
    train_step(model, loss_fn, batch)
    results.put((rank, (host_peak_memory() - baseline) / 2**20, time.perf_counter() - start))
    dist.destroy_process_group()


def _free_port() -> int:
    """A TCP port on localhost that is free now, for the ranks' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_step_memory(cp: int, seq_len: int, shares: list[int]) -> list[tuple[float, float]]:
    """``(peak extra MiB, seconds)`` of one training step on each of ``cp`` fresh processes.

    The ranks run with glibc's mmap threshold fixed at 64 KiB: tensors are then mapped and
    unmapped as they are allocated and freed, so RSS follows live tensors rather than heap
    pages glibc keeps after a free (its default threshold grows to 32 MiB, and the heap
    holding shorter sequences' activations inflated VmHWM by up to ~2x).
    """
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # read by the spawned interpreters
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_memory_rank, args=(cp, seq_len, shares, _free_port(), results), nprocs=cp)
    per_rank = sorted(results.get() for _ in range(cp))
    return [(extra, seconds) for _, extra, seconds in per_rank]


def step_memory(args: argparse.Namespace) -> None:
    """Print the peak activation memory per rank of one training step at cp = 1 and 2."""
    seq_len = args.seq_len or MEMORY_SEQ_LEN
    a = MODEL_ARGS
    print(
        f"\ntraining-step activation memory per rank, T = {seq_len}: one packed row of "
        f"{len(args.documents)} document(s), lengths {args.documents} / {sum(args.documents)} of it"
    )
    print(
        f"model: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads / {a.n_kv_heads} kv heads, "
        f"SwiGLU {a.hidden_dim}, vocab {a.vocab_size}; fp32, activation checkpointing on, "
        f"FSDP2, ChunkedLinearCrossEntropy, forward + backward (no optimizer step)"
    )
    print(f"{'cp':>3} {'ranks':>5} {'peak extra MB/rank':>19} {'per rank MB':>21} {'step s':>7} {'ratio to cp=1':>14}")
    reference: float | None = None
    for cp in (1, 2):
        ranks = measure_step_memory(cp, seq_len, args.documents)
        peak = max(extra for extra, _ in ranks) * 2**20 / 1e6
        reference = reference or peak
        per_rank = " ".join(f"{extra * 2**20 / 1e6:.0f}" for extra, _ in ranks)
        seconds = max(s for _, s in ranks)
        print(f"{cp:>3} {cp:>5} {peak:>19.0f} {per_rank:>21} {seconds:>7.1f} {peak / reference:>14.2f}")
    print("target: cp=2 at most 0.60x of cp=1")


PARTS: dict[str, Callable[[argparse.Namespace], None]] = {
    "balance": attention_balance,
    "memory": step_memory,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=sorted(PARTS))
    parser.add_argument(
        "--seq-len",
        type=int,
        help=f"sequence length (default: {BALANCE_SEQ_LEN} for balance, a multiple "
        f"of 16 = 2 * the largest cp; {MEMORY_SEQ_LEN} for memory)",
    )
    parser.add_argument(
        "--documents",
        type=int,
        nargs="+",
        default=DOCUMENT_SHARES,
        help=f"memory: relative lengths of the documents packed into the row "
        f"(default: {' '.join(map(str, DOCUMENT_SHARES))})",
    )
    args = parser.parse_args()
    for part in args.parts:
        PARTS[part](args)


if __name__ == "__main__":
    main()
