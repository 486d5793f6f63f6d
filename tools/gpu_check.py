"""One GPU check, in minutes: every CUDA path of OmniLong at real shapes, against an fp32 reference.

All checks run in this one process, most important first (attention kernels, loss, ring,
activation offload, host syncs, then the slower ones), each isolated: an exception or an
out-of-memory error is that check's FAIL row with a one-line error and the next check runs;
memory is freed between checks. The table is printed row by row as the checks end and
rewritten (``gpu_check.md``, and ``gpu_check.json`` with the full tracebacks) in ``--out``
after every row, so a run cut short still leaves the rows done. Checks left when
``--budget-s`` is spent are SKIPPED; the exit status is 1 when a check FAILED. The shapes
are sized for one GPU in under 6 minutes, compilation included.

Columns: the worst error of the check against its tolerance (relative errors,
``max |x - ref| / max |ref|`` per tensor, of model gradients in L2; the log-sum-exp's is
absolute; the sync rows count host syncs), the time of the measured operation (mean of
repeats after a warm-up) and the check's wall time, compilation included.

References: attention against the fp32 path of the same entry point on the same inputs (on
CUDA the exact kernel, on CPU the CPU kernel), one key/value head at a time; the loss against
plain fp32 math, and against Liger's fused linear cross-entropy for agreement and speed;
models in bf16 against their fp32 copies with the same (bf16-rounded) weights.

On the GPU machine, with the packages that travel as wheels (omegaconf for the decoding
checks, liger-kernel for the Liger rows; see ``../shared/GPU.md``):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 tools/gpu_check.py --out $OUT

    python tools/gpu_check.py --list
    python tools/gpu_check.py --only 'attn_*' loss_16k --out DIR
    python tools/gpu_check.py --smoke          # tiny shapes; on CPU, what the CPU allows
"""

import argparse
import contextlib
import copy
import fnmatch
import gc
import importlib.metadata
import inspect
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch

from omnilong.constants import IGNORE_INDEX
from omnilong.loss import ChunkedLinearCrossEntropy
from omnilong.models.attention import attention_backward, attention_with_lse, document_segments, row_segments
from omnilong.models.llava_onevision.args import SiglipVisionArgs
from omnilong.models.llava_onevision.vision import SiglipVisionTower
from omnilong.models.qwen2_5_vl import qwen2_5_vl, qwen2_5_vl_vision
from omnilong.models.qwen2_5_vl.args import Qwen2_5_VLTextArgs, Qwen2_5_VLVisionArgs
from omnilong.models.qwen2_5_vl.model import text_position_ids
from omnilong.models.qwen2_5_vl.vision import window_order
from omnilong.models.rope import multimodal_rope_cos_sin
from omnilong.models.varlen_attention import VarlenSegments, pack_tokens, unpack_tokens
from omnilong.parallel import plan_ring, ring_backward, ring_forward, run_local_ring, shard_sequence, unshard_sequence
from omnilong.parallel.activation_offload import activation_offload
from omnilong.parallel.fsdp import apply_activation_checkpointing
from omnilong.testing.host_syncs import HostSync, cuda_sync_error, describe, host_syncs

T = TypeVar("T")

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

# Relative error allowed of low-precision results against fp32 on the same inputs. A wrong
# mask, scale or layout gives errors of order 1; rounding gives a few units of the dtype's eps
# (bf16 7.8e-3, fp16 9.8e-4), more where whole models in bf16 are compared.
KERNEL_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
LSE_TOLERANCE = 1e-3  # absolute: the log-sum-exp is fp32 from exact products of the inputs
LOSS_TOLERANCE = 1e-3  # the loss value: fp32 logits of the same bf16 inputs
DRY_RUN_TOLERANCE = 0.10  # the dry run's peak against torch.cuda's (allocator rounding, cuBLAS workspaces)
MODEL_TOLERANCE = 5e-2  # a few bf16 layers against their fp32 copy (gradients: L2, see gradient_error)


class Skip(Exception):
    """The check cannot run here; the message says why."""


@dataclass
class Outcome:
    """What a check found.

    Attributes:
        errors: ``name -> (error, tolerance)``; every error must be within its tolerance.
        seconds: time of the measured operation (per call), if it has one.
        note: what was run (shapes) and any measurement worth a line.
        failure: a failed condition other than the errors (e.g. a peak that did not drop).
    """

    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    seconds: float | None = None
    note: str = ""
    failure: str = ""

    @property
    def passed(self) -> bool:
        return not self.failure and all(error <= tolerance for error, tolerance in self.errors.values())

    def worst(self) -> tuple[str, float, float] | None:
        """The error furthest beyond (or closest to) its tolerance (NaN counts as infinite)."""

        def ratio(item: tuple[str, tuple[float, float]]) -> float:
            error, tolerance = item[1]
            if error != error or (error > 0 and tolerance == 0):
                return float("inf")
            return error / tolerance if tolerance else 0.0

        if not self.errors:
            return None
        name, (error, tolerance) = max(self.errors.items(), key=ratio)
        return name, error, tolerance


@dataclass
class Row:
    """One line of the table."""

    check: str
    status: str
    error: float | None
    tolerance: float | None
    seconds: float | None
    wall_s: float
    note: str
    traceback: str = ""


@dataclass
class Context:
    """Where the checks run, and how big: ``pick(real, smoke)`` chooses a size."""

    device: torch.device
    smoke: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def pick(self, real: T, smoke: T) -> T:
        return smoke if self.smoke else real

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def seconds(self, fn: Callable[[], Any], repeats: int = 3) -> float:
        """Mean wall time of ``fn()`` over ``repeats`` calls, the device synchronized (warm up first)."""
        self.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        self.synchronize()
        return (time.perf_counter() - start) / repeats

    def peak(self, fn: Callable[[], T]) -> tuple[T, int | None]:
        """``fn()`` and the peak memory it allocated above what was allocated before it, in
        bytes (CUDA; ``None`` on CPU)."""
        if not self.cuda:
            return fn(), None
        self.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        result = fn()
        self.synchronize()
        return result, torch.cuda.max_memory_allocated(self.device) - before

    def syncs(self, fn: Callable[[], Any]) -> list[HostSync]:
        """The host syncs of ``fn()`` (:func:`omnilong.testing.host_syncs.host_syncs`), after
        checking that the recorder sees a deliberate one. On CUDA, when it records none, ``fn``
        runs once more in torch's "error" mode, which no warning filter inside ``fn`` can silence."""
        with host_syncs(self.device) as probe:
            torch.ones(2, device=self.device).sum().item()
        if not probe:
            raise RuntimeError("the host-sync recorder saw no sync in a lone .item()")
        with host_syncs(self.device) as found:
            fn()
        if found or not self.cuda:
            return found
        hidden = cuda_sync_error(fn)
        return [] if hidden is None else [hidden]

    def free(self) -> None:
        """Drop what the last check left on the GPU: garbage, cached blocks, peak statistics."""
        if self.cuda:
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)


# ----------------------------------------------------------------------------- helpers


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|``, in fp32."""
    want = want.detach().float()
    scale = want.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return ((got.detach().float() - want).abs().max() / scale).item()


def absolute_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.detach().float() - want.detach().float()).abs().max().item()


def gradient_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The worst ``||g - w|| / ||w||`` over a model's parameter gradients ``want`` (L2 norms: a
    parameter's rounding errors add up in quadrature, a wrong gradient is off by its whole
    norm), ``||w||`` floored at 1e-3 of the largest gradient norm: a key bias's gradient is zero
    in exact arithmetic, and its rounding noise is not an error."""
    norms = {name: torch.linalg.vector_norm(w.float()).item() for name, w in want.items()}
    floor = 1e-3 * max(norms.values())
    return max(
        torch.linalg.vector_norm(got[name].float() - want[name].float()).item() / max(norm, floor)
        for name, norm in norms.items()
    )


def packed_document_ids(rows: int, length: int, documents: int, seed: int = 0) -> torch.Tensor:
    """``[rows, length]`` document ids: each row packed with ``documents`` documents cut at
    random places (lengths from one token up), ids counting from 0 in every row."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.zeros(rows, length, dtype=torch.long)
    for row in range(rows):
        starts[row, torch.randperm(length - 1, generator=generator)[: documents - 1] + 1] = 1
    return starts.cumsum(-1)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, segments: VarlenSegments
) -> dict[str, torch.Tensor]:
    """fp32 ``out [N, Hq, D]``, ``lse [Hq, N]`` and gradients ``dq``, ``dk``, ``dv`` of attention
    over ``segments``, from the fp32 path of the attention entry point (the exact kernel on
    CUDA, the CPU kernel on CPU), one key/value head and its query heads at a time so that the
    exact kernel's ``[n, Hq / Hkv, Lq, Lk]`` scores stay a few GB."""
    group = q.shape[1] // k.shape[1]
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in ("out", "lse", "dq", "dk", "dv")}
    for head in range(k.shape[1]):
        queries = slice(head * group, (head + 1) * group)
        qh, dh = (x[:, queries].float().contiguous() for x in (q, dout))
        kh, vh = (x[:, head : head + 1].float().contiguous() for x in (k, v))
        out, lse = attention_with_lse(qh, kh, vh, segments)
        grads = attention_backward(dh, qh, kh, vh, out, lse, segments)
        for name, value in zip(parts, (out, lse, *grads)):
            parts[name].append(value)
    return {name: torch.cat(values, dim=0 if name == "lse" else 1) for name, values in parts.items()}


def reference_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``hidden [N, H] @ weight[V, H].T`` over the non-ignored labels and its
    gradients, in plain fp32 math, ``chunk`` rows at a time:
    ``d logits = (softmax(logits) - onehot(y)) / n`` on kept rows, ``d hidden = d logits @ W``,
    ``d W = d logits^T @ hidden``.

    Returns:
        ``loss`` (0-d), ``d_hidden [N, H]``, ``d_weight [V, H]``, all fp32.
    """
    h, w = hidden.detach().float(), weight.detach().float()
    kept = labels != IGNORE_INDEX
    count = kept.sum().clamp_min(1)
    loss = torch.zeros((), dtype=torch.float64, device=h.device)
    d_hidden, d_weight = torch.zeros_like(h), torch.zeros_like(w)
    for start in range(0, h.shape[0], chunk):
        rows = slice(start, start + chunk)
        logits = h[rows] @ w.T  # [c, V]
        targets = labels[rows].clamp_min(0)[:, None]
        keep = kept[rows].float()
        loss += ((logits.logsumexp(-1) - logits.gather(1, targets)[:, 0]) * keep).sum(dtype=torch.float64)
        grad = torch.softmax(logits, dim=-1)
        grad.scatter_add_(1, targets, -torch.ones_like(targets, dtype=grad.dtype))
        grad *= (keep / count)[:, None]
        d_hidden[rows] = grad @ w
        d_weight += grad.T @ h[rows]
    return (loss / count).float(), d_hidden, d_weight


def _loss_inputs(ctx: Context, tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden [T, H]`` and ``weight [V, H]`` (requiring gradients) and ``labels [T]`` with a tenth
    ignored: Qwen2.5-VL-7B's H = 3584, V = 152,064 (smoke: 64, 1000)."""
    dim, vocab = ctx.pick(3584, 64), ctx.pick(152064, 1000)
    torch.manual_seed(0)
    hidden = torch.randn(tokens, dim, device=ctx.device, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, device=ctx.device) * dim**-0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=ctx.device)
    labels[torch.rand(tokens, device=ctx.device) < 0.1] = IGNORE_INDEX
    return hidden, weight, labels


def _backward_step(loss_of: Callable[[], torch.Tensor], *tensors: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A step that clears ``tensors``' gradients, computes the loss and back-propagates it."""

    def step() -> torch.Tensor:
        for tensor in tensors:
            tensor.grad = None
        loss = loss_of()
        loss.backward()
        return loss.detach()

    return step


def _text_args(ctx: Context, layers: int, vocab: int, **real: int) -> Qwen2_5_VLTextArgs:
    """A Qwen2.5-VL language model shape: 7B's attention and MLP unless ``real`` overrides them;
    smoke: dim 512, 4 query / 2 key-value heads of 128, MLP 512."""
    dims = ctx.pick(real, dict(dim=512, n_heads=4, n_kv_heads=2, hidden_dim=512))
    return Qwen2_5_VLTextArgs(vocab_size=vocab, n_layers=layers, **dims)


def _on_device(ctx: Context, build: Callable[[], torch.nn.Module], dtype: torch.dtype) -> torch.nn.Module:
    """``build()`` (random init, seed 0) on the device in ``dtype``."""
    torch.manual_seed(0)
    with torch.device(ctx.device):
        return build().to(dtype)


def _fp32_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An fp32 copy with the same (low-precision-rounded) weights: the reference model."""
    return copy.deepcopy(model).float()


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@contextlib.contextmanager
def _recorded_into(records: list[HostSync], device: torch.device) -> Iterator[None]:
    with host_syncs(device) as found:
        yield
    records.extend(found)


# ----------------------------------------------------------------------------- attention kernels


def _decoder_rows(ctx: Context) -> tuple[int, int, int, VarlenSegments]:
    """One causal sequence of many flash blocks, Qwen2.5-VL-7B's 28 / 4 heads of 128."""
    heads, kv_heads = ctx.pick((28, 4), (7, 1))
    return heads, kv_heads, 128, row_segments(1, ctx.pick(8192, 128), causal=True, device=ctx.device)


def _decoder_documents(ctx: Context) -> tuple[int, int, int, VarlenSegments]:
    """Two rows packed with hundreds of causal documents, 28 / 4 heads of 128."""
    heads, kv_heads = ctx.pick((28, 4), (7, 1))
    ids = packed_document_ids(2, ctx.pick(8192, 128), ctx.pick(150, 6))
    return heads, kv_heads, 128, document_segments(ids.to(ctx.device))


def _vision_windows(ctx: Context) -> tuple[int, int, int, VarlenSegments]:
    """The Qwen2.5-VL vision tower's windows of an image and a video (partial windows at the
    edges), 16 heads of 80."""
    args = Qwen2_5_VLVisionArgs()
    grids = ctx.pick([(1, 34, 50), (4, 32, 32)], [(1, 6, 10)])
    _, lengths = window_order(grids, args.spatial_merge_size, args.window_units)
    segments = VarlenSegments.from_lengths(lengths, lengths, causal=False, device=ctx.device)
    return args.n_heads, args.n_heads, args.head_dim, segments


def _siglip_images(ctx: Context) -> tuple[int, int, int, VarlenSegments]:
    """SigLIP's images of 27 x 27 patches, each attended whole, 16 heads of 72."""
    args = SiglipVisionArgs()
    images, tokens = ctx.pick((16, args.grid**2), (3, 49))
    return args.n_heads, args.n_heads, args.dim // args.n_heads, row_segments(images, tokens, False, ctx.device)


def _attention_check(layout: Callable[[Context], tuple[int, int, int, VarlenSegments]], dtype: torch.dtype):
    def run(ctx: Context) -> Outcome:
        heads, kv_heads, head_dim, segments = layout(ctx)
        tokens = segments.bounds[-1][1]
        torch.manual_seed(0)
        q = torch.randn(tokens, heads, head_dim, device=ctx.device, dtype=dtype)
        k, v = (torch.randn(tokens, kv_heads, head_dim, device=ctx.device, dtype=dtype) for _ in range(2))
        dout = torch.randn_like(q)

        def step() -> tuple[torch.Tensor, ...]:
            out, lse = attention_with_lse(q, k, v, segments)
            return out, lse, *attention_backward(dout, q, k, v, out, lse, segments)

        got = dict(zip(("out", "lse", "dq", "dk", "dv"), step()))
        seconds = ctx.seconds(step)
        want = reference_attention(q, k, v, dout, segments)
        tolerance = KERNEL_TOLERANCE[dtype]
        errors = {name: (relative_error(got[name], want[name]), tolerance) for name in ("out", "dq", "dk", "dv")}
        errors["lse"] = (absolute_error(got["lse"], want["lse"]), LSE_TOLERANCE)
        shape = f"{tokens} tokens in {len(segments.bounds)} segments, {heads}/{kv_heads} heads of {head_dim}"
        return Outcome(errors, seconds, f"{shape}, forward+backward")

    run.__doc__ = f"{layout.__doc__.rstrip('.')}; {str(dtype).removeprefix('torch.')}, forward and backward."
    return run


# ----------------------------------------------------------------------------- loss


def _loss_check(real_tokens: int):
    def run(ctx: Context) -> Outcome:
        tokens = ctx.pick(real_tokens, 256)
        hidden, weight, labels = _loss_inputs(ctx, tokens, torch.bfloat16)
        loss_fn = ChunkedLinearCrossEntropy()
        step = _backward_step(lambda: loss_fn(hidden, weight, labels), hidden, weight)
        step()  # warm-up: on CUDA the first call compiles
        seconds = ctx.seconds(step)
        hidden.grad = weight.grad = None
        loss, peak = ctx.peak(step)
        want = reference_linear_cross_entropy(hidden, weight, labels, chunk=ctx.pick(4096, 64))
        errors = {
            "loss": (relative_error(loss, want[0]), LOSS_TOLERANCE),
            "d_hidden": (relative_error(hidden.grad, want[1]), KERNEL_TOLERANCE[torch.bfloat16]),
            "d_weight": (relative_error(weight.grad, want[2]), KERNEL_TOLERANCE[torch.bfloat16]),
        }
        memory = "" if peak is None else f", peak extra {peak / 2**30:.2f} GiB"
        note = f"T={tokens} H={hidden.shape[1]} V={weight.shape[0]} bf16, forward+backward{memory}"
        return Outcome(errors, seconds, note)

    run.__doc__ = (
        f"ChunkedLinearCrossEntropy at V = 152,064, H = 3584, {real_tokens // 1024}K tokens, bf16, "
        "against fp32 math: the loss and both gradients."
    )
    return run


def _liger_check(real_tokens: int):
    def run(ctx: Context) -> Outcome:
        if not ctx.cuda:
            raise Skip("needs CUDA")
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            raise Skip("liger not installed") from None
        fp32_sums = "accum_dtype" in inspect.signature(LigerFusedLinearCrossEntropyLoss).parameters
        theirs = LigerFusedLinearCrossEntropyLoss(
            ignore_index=IGNORE_INDEX, **({"accum_dtype": torch.float32} if fp32_sums else {})
        )
        ours = ChunkedLinearCrossEntropy()
        tokens = ctx.pick(real_tokens, 256)
        hidden, weight, labels = _loss_inputs(ctx, tokens, torch.bfloat16)
        runs = {}
        for name, loss_of in (
            ("omnilong", lambda: ours(hidden, weight, labels)),
            ("liger", lambda: theirs(weight, hidden, labels)),
        ):
            step = _backward_step(loss_of, hidden, weight)
            step()  # warm-up: compiles
            seconds = ctx.seconds(step)
            hidden.grad = weight.grad = None
            loss, peak = ctx.peak(step)
            runs[name] = (loss, hidden.grad, weight.grad, seconds, peak)
        (loss, d_hidden, d_weight, seconds, peak), liger = runs["omnilong"], runs["liger"]
        tolerance = KERNEL_TOLERANCE[torch.bfloat16]
        errors = {
            "loss": (relative_error(loss, liger[0]), LOSS_TOLERANCE),
            "d_hidden": (relative_error(d_hidden, liger[1]), tolerance),
            "d_weight": (relative_error(d_weight, liger[2]), tolerance),
        }
        note = (
            f"T={tokens} bf16 (Liger sums the weight gradient in {'fp32' if fp32_sums else 'bf16'}): "
            f"omnilong {seconds:.3f} s, {peak / 2**30:.2f} GiB; liger {liger[3]:.3f} s, {liger[4] / 2**30:.2f} GiB; "
            f"time x{seconds / liger[3]:.2f}, memory x{peak / liger[4]:.2f} of Liger's"
        )
        return Outcome(errors, seconds, note)

    run.__doc__ = (
        f"ChunkedLinearCrossEntropy against Liger's fused linear cross-entropy at {real_tokens // 1024}K "
        "tokens: agreement, time and peak memory (SKIP without liger)."
    )
    return run


# ----------------------------------------------------------------------------- ring attention


class RingCase:
    """One full sequence (``[1, H, T, D]``, packed documents or one causal sequence) cut into the
    zigzag shards of ``cp`` virtual ranks, each rank's ring steps planned once."""

    def __init__(self, ctx: Context, cp: int, documents: int | None, dtype: torch.dtype = torch.bfloat16):
        self.ctx, self.cp = ctx, cp
        tokens, heads, kv_heads, head_dim = ctx.pick(8192, 64), 28, 4, 128
        torch.manual_seed(cp)
        self.q = torch.randn(1, heads, tokens, head_dim, device=ctx.device, dtype=dtype)
        self.k, self.v = (torch.randn(1, kv_heads, tokens, head_dim, device=ctx.device, dtype=dtype) for _ in range(2))
        self.dout = torch.randn_like(self.q)
        ids = None if documents is None else packed_document_ids(1, tokens, documents, seed=cp)
        shard_ids = None if ids is None else [shard_sequence(ids, rank, cp).tolist() for rank in range(cp)]
        self.shards = [
            [pack_tokens(shard_sequence(x, rank, cp, dim=2)) for x in (self.q, self.k, self.v, self.dout)]
            for rank in range(cp)
        ]
        self.plans = [plan_ring(rank, cp, shard_ids, 1, tokens // cp, ctx.device) for rank in range(cp)]
        self.segments = (
            row_segments(1, tokens, True, ctx.device) if ids is None else document_segments(ids.to(ctx.device))
        )

    def run(self, rank_guard: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> list:
        """Ring forward and backward on every virtual rank (each inside ``rank_guard()``);
        returns each rank's ``(out, dq, dk, dv)``."""

        def rank_fn(ring) -> tuple[torch.Tensor, ...]:
            q, k, v, dout = self.shards[ring.rank]
            steps = self.plans[ring.rank]
            with rank_guard():
                out, lse = ring_forward(q, k, v, steps, ring)
                return out, *ring_backward(dout, q, k, v, out, lse, steps, ring)

        return run_local_ring(self.cp, rank_fn, timeout=60.0)

    def errors(self, per_rank: list) -> dict[str, float]:
        """Relative errors of the unsharded results against the fp32 reference on the full sequence."""
        got = [pack_tokens(unshard_sequence([unpack_tokens(rank[i], 1) for rank in per_rank], dim=2)) for i in range(4)]
        want = reference_attention(*(pack_tokens(x) for x in (self.q, self.k, self.v, self.dout)), self.segments)
        return {name: relative_error(x, want[name]) for name, x in zip(("out", "dq", "dk", "dv"), got)}


def _ring_check(cp: int):
    def run(ctx: Context) -> Outcome:
        errors, notes, seconds = {}, [], 0.0
        for case, documents in (("causal", None), ("documents", ctx.pick(100, 5))):
            ring = RingCase(ctx, cp, documents)
            per_rank = ring.run()
            case_seconds = ctx.seconds(ring.run, repeats=2)
            seconds = max(seconds, case_seconds)
            for name, error in ring.errors(per_rank).items():
                errors[f"{case} {name}"] = (error, KERNEL_TOLERANCE[torch.bfloat16])
            notes.append(f"{case} {case_seconds:.3f} s")
        tokens = ring.q.shape[2]
        return Outcome(errors, seconds, f"T={tokens} bf16, 28/4 heads of 128, forward+backward: " + ", ".join(notes))

    run.__doc__ = (
        f"Ring attention on {cp} virtual ranks (threads, one GPU): an 8K-token sequence in zigzag shards, causal "
        "and packed with 100 documents, bf16, against fp32 attention on the full sequence."
    )
    return run


# ----------------------------------------------------------------------------- activation offload


def check_offload_peak(ctx: Context) -> Outcome:
    """Activation offload: peak memory of three training steps of an 8-layer model with
    activation checkpointing, 32K tokens, with and without offload; the gradients must match."""
    args = _text_args(ctx, ctx.pick(8, 3), ctx.pick(4096, 256), dim=2048, n_heads=16, n_kv_heads=4, hidden_dim=5632)
    tokens = ctx.pick(32768, 256)
    model = _on_device(ctx, lambda: qwen2_5_vl(args), torch.bfloat16)
    apply_activation_checkpointing(model)
    initial = {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}
    torch.manual_seed(1)
    input_ids = torch.randint(0, args.vocab_size, (1, tokens), device=ctx.device)
    document_ids = packed_document_ids(1, tokens, 8).to(ctx.device)

    def train(offload: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], int | None, float]:
        """Three steps from the same weights; returns the losses, the third step's gradients,
        the peak memory and the seconds per step."""
        model.load_state_dict(initial)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        offloading = activation_offload(offload, ctx.device)
        losses = []

        def steps() -> None:
            for step in range(3):
                with offloading:
                    hidden = model(input_ids, document_ids=document_ids, return_hidden=True)
                loss = hidden.float().square().mean()
                loss.backward()
                losses.append(loss.detach())
                if step < 2:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

        ctx.free()
        start = time.perf_counter()
        _, peak = ctx.peak(steps)
        seconds = (time.perf_counter() - start) / 3
        grads = {name: grad.float().cpu() for name, grad in _gradients(model).items()}
        optimizer.zero_grad(set_to_none=True)
        return losses, grads, peak, seconds

    plain, offloaded = train(False), train(True)
    errors = {
        "losses": (max(relative_error(a, b) for a, b in zip(offloaded[0], plain[0])), LOSS_TOLERANCE),
        "gradients": (gradient_error(offloaded[1], plain[1]), KERNEL_TOLERANCE[torch.bfloat16]),
    }
    if not ctx.cuda:
        if all(error <= tolerance for error, tolerance in errors.values()):
            raise Skip(f"needs CUDA (no offload on CPU; the two runs agree: {errors['gradients'][0]:.1e})")
        return Outcome(errors, note="the runs with and without offload disagree")
    layer_input = tokens * args.dim * 2  # one checkpointed layer's saved input, bf16
    lowered = plain[2] - offloaded[2]
    note = (
        f"{args.n_layers} layers dim {args.dim}, T={tokens}: peak {plain[2] / 2**30:.2f} GiB without, "
        f"{offloaded[2] / 2**30:.2f} GiB with offload (layer inputs {args.n_layers * layer_input / 2**30:.2f} GiB); "
        f"step {plain[3]:.3f} s without, {offloaded[3]:.3f} s with"
    )
    failure = "" if lowered >= layer_input else "offload did not lower the peak by one layer input"
    return Outcome(errors, offloaded[3], note, failure)


# ----------------------------------------------------------------------------- host syncs


def _sync_outcome(syncs: list[HostSync], ctx: Context, what: str) -> Outcome:
    stand_in = "" if ctx.cuda else " (CPU stand-in: sees reads and data-dependent ops, not copies)"
    return Outcome({"host syncs": (len(syncs), 0)}, note=f"{what}: {describe(syncs)}{stand_in}")


class LayerStep:
    """Forward and backward of a model's decoder layers alone, the batch planned before them
    (``core.plan``, which reads the document ids back once, and the rotary tables)."""

    def __init__(self, ctx: Context, layers: int, tokens: int):
        args = _text_args(ctx, layers, 1024, dim=3584, n_heads=28, n_kv_heads=4, hidden_dim=18944)
        self.model = _on_device(ctx, lambda: qwen2_5_vl(args), torch.bfloat16)
        apply_activation_checkpointing(self.model)
        torch.manual_seed(1)
        input_ids = torch.randint(0, args.vocab_size, (1, tokens), device=ctx.device)
        document_ids = packed_document_ids(1, tokens, 16).to(ctx.device)
        self.plan = self.model.layers[0].attention.core.plan(input_ids, document_ids)
        positions = text_position_ids(input_ids, None)
        self.rope = multimodal_rope_cos_sin(
            positions, args.head_dim, args.rope_theta, args.mrope_section, torch.bfloat16
        )
        self.x = self.model.tok_embeddings(input_ids).detach().requires_grad_()

    def __call__(self, forward_context: contextlib.AbstractContextManager | None = None) -> None:
        with forward_context or contextlib.nullcontext():
            h = self.x
            for layer in self.model.layers:
                h = layer(h, self.rope, self.plan)
        h.float().square().mean().backward()


def check_sync_layers(ctx: Context) -> Outcome:
    """No host sync in two 7B decoder layers' forward, recompute and backward (packed documents,
    activation checkpointing), 8K tokens."""
    step = LayerStep(ctx, 2, ctx.pick(8192, 128))
    step()  # warm-up
    return _sync_outcome(ctx.syncs(step), ctx, "2 layers forward+backward")


def check_sync_ring(ctx: Context) -> Outcome:
    """No host sync in ring attention's forward and backward on 2 virtual ranks (packed documents)."""
    ring = RingCase(ctx, 2, ctx.pick(100, 5))
    ring.run()  # warm-up
    if ctx.cuda:
        syncs = ctx.syncs(ring.run)
    else:  # the CPU stand-in watches the operators of its own thread: one guard per virtual rank
        syncs = []
        ctx.syncs(lambda: ring.run(lambda: _recorded_into(syncs, ctx.device)))
    return _sync_outcome(syncs, ctx, "ring forward+backward, cp=2")


def check_sync_decode(ctx: Context) -> Outcome:
    """No host sync in a cached decoding step (one token through two 7B layers after a 4K prompt),
    the greedy choice of the token excepted."""
    from omnilong.generation import cached_logits  # needs omegaconf (a wheel on the GPU machine)

    model = _on_device(ctx, lambda: qwen2_5_vl(_text_args(ctx, 2, ctx.pick(8192, 256))), torch.bfloat16).eval()
    torch.manual_seed(1)
    prompt = torch.randint(0, model.args.vocab_size, (1, ctx.pick(4096, 64)), device=ctx.device)
    steps = cached_logits(model, {"input_ids": prompt})
    try:
        logits = steps.send(int(next(steps).argmax()))  # prefill and a first step (warm-up)
        token = int(logits.argmax())
        syncs = ctx.syncs(lambda: steps.send(token))
    finally:
        steps.close()
    return _sync_outcome(syncs, ctx, "one decode step (cached_logits.send)")


def check_sync_offload(ctx: Context) -> Outcome:
    """No host sync in two 7B decoder layers' forward and backward with activation offload, 8K tokens."""
    step = LayerStep(ctx, 2, ctx.pick(8192, 128))
    offloading = activation_offload(True, ctx.device)
    step(offloading)  # warm-up
    syncs = ctx.syncs(lambda: step(offloading))
    outcome = _sync_outcome(syncs, ctx, "2 layers forward+backward, activations offloaded")
    if not ctx.cuda:
        raise Skip(f"needs CUDA (no offload on CPU; {outcome.note})")
    return outcome


def check_sync_loss(ctx: Context) -> Outcome:
    """No host sync in the loss's forward and backward (16K tokens), labels on the device and on the host."""
    hidden, weight, labels = _loss_inputs(ctx, ctx.pick(16384, 256), torch.bfloat16)
    loss_fn = ChunkedLinearCrossEntropy()
    found, failures = {}, []
    for place, placed in (("device labels", labels), ("host labels", labels.cpu())):
        step = _backward_step(lambda placed=placed: loss_fn(hidden, weight, placed), hidden, weight)
        try:  # one placement failing still reports the other's syncs
            step()  # warm-up: compiles
            found[place] = ctx.syncs(step)
        except Exception as error:
            failures.append(f"{place}: {_one_line(error)}")
    note = "; ".join(f"{place}: {describe(syncs)}" for place, syncs in found.items())
    if not ctx.cuda:
        raise Skip(f"needs CUDA (on CPU the labels are on the host either way; CPU stand-in: {note})")
    return Outcome({place: (len(syncs), 0) for place, syncs in found.items()}, note=note, failure="; ".join(failures))


# ----------------------------------------------------------------------------- models


def _bf16_against_fp32(
    ctx: Context, model: torch.nn.Module, forward: Callable[[torch.nn.Module], torch.Tensor]
) -> Outcome:
    """Forward and backward of ``model`` (bf16) and of its fp32 copy; errors of the output and of
    the worst parameter gradient, time of the bf16 forward+backward."""
    reference = _fp32_copy(model)
    out = forward(model)
    torch.manual_seed(2)
    dout = torch.randn(out.shape, device=ctx.device)
    (out.float() * dout).sum().backward()
    grads = _gradients(model)
    seconds = ctx.seconds(_backward_step(lambda: (forward(model).float() * dout).sum(), *model.parameters()))
    want = forward(reference)
    (want * dout).sum().backward()
    errors = {
        "out": (relative_error(out, want), MODEL_TOLERANCE),
        "gradients": (gradient_error(grads, _gradients(reference)), MODEL_TOLERANCE),
    }
    return Outcome(errors, seconds)


def check_vision_qwen(ctx: Context) -> Outcome:
    """The Qwen2.5-VL vision tower (7B dims, 2 blocks: windows, then a frame-pair block) on an
    image and a 4-frame-pair video, bf16 against fp32."""
    args = ctx.pick(
        Qwen2_5_VLVisionArgs(depth=2, fullatt_block_indexes=[1]),
        Qwen2_5_VLVisionArgs(depth=2, dim=160, n_heads=2, hidden_dim=128, out_dim=64, fullatt_block_indexes=[1]),
    )
    grids = ctx.pick([(1, 34, 50), (4, 32, 32)], [(1, 6, 10), (2, 4, 4)])
    tower = _on_device(ctx, lambda: qwen2_5_vl_vision(args), torch.bfloat16)
    patches = sum(t * h * w for t, h, w in grids)
    pixel_values = torch.randn(patches, args.patch_dim, device=ctx.device)
    grid_thw = torch.tensor(grids, device=ctx.device)
    outcome = _bf16_against_fp32(ctx, tower, lambda m: m(pixel_values, grid_thw))
    outcome.note = f"{patches} patches, grids {grids}, dim {args.dim}, {args.n_heads} heads of {args.head_dim}"
    return outcome


def check_vision_siglip(ctx: Context) -> Outcome:
    """LLaVA-OneVision's SigLIP tower (so400m dims, 2 layers) on eight 384 x 384 images, bf16 against fp32."""
    args = ctx.pick(
        SiglipVisionArgs(n_layers=2), SiglipVisionArgs(dim=144, n_layers=2, n_heads=2, hidden_dim=64, image_size=56)
    )
    tower = _on_device(ctx, lambda: SiglipVisionTower(args), torch.bfloat16)
    images = torch.randn(ctx.pick(8, 2), args.in_channels, args.image_size, args.image_size, device=ctx.device)
    outcome = _bf16_against_fp32(ctx, tower, lambda m: m(images))
    outcome.note = (
        f"{images.shape[0]} images of {args.grid**2} patches, dim {args.dim}, {args.n_heads} heads of "
        f"{args.dim // args.n_heads} (fp32 reference: cuDNN may run its convolution in TF32)"
    )
    return outcome


def _attend_to_self(model: torch.nn.Module, scale: float = 3.0) -> None:
    """Make half of every layer's key/value heads attend (almost) only to each token's own key:
    their query heads copy the key projection, both scaled by ``scale``, so that a token's score
    with itself (about 3.8 * scale^2 for default-initialised 128-dim heads) dwarfs its scores with
    other tokens (standard deviation about 0.33 * scale^2). A decode step that misses its newest
    keys then moves the logits far beyond rounding; the other heads stay random and attend
    broadly, over the prompt."""
    with torch.no_grad():
        for layer in model.layers:
            attention = layer.attention
            group, dim = attention.n_heads // attention.n_kv_heads, attention.head_dim
            for kv_head in range(attention.n_kv_heads // 2):
                keys = slice(kv_head * dim, (kv_head + 1) * dim)
                attention.wk.weight[keys] *= scale
                attention.wk.bias[keys] *= scale
                for head in range(kv_head * group, (kv_head + 1) * group):
                    attention.wq.weight[head * dim : (head + 1) * dim] = attention.wk.weight[keys]
                    attention.wq.bias[head * dim : (head + 1) * dim] = attention.wk.bias[keys]


def check_decode(ctx: Context) -> Outcome:
    """Cached greedy decoding: two 7B layers (half the heads attending to each token's own key),
    4K-token prompt, 8 new tokens, bf16; each step's logits against an fp32 forward of the whole
    sequence."""
    from omnilong.generation import cached_logits  # needs omegaconf (a wheel on the GPU machine)

    model = _on_device(ctx, lambda: qwen2_5_vl(_text_args(ctx, 2, ctx.pick(8192, 256))), torch.bfloat16).eval()
    _attend_to_self(model)
    torch.manual_seed(1)
    prompt = torch.randint(0, model.args.vocab_size, (1, ctx.pick(4096, 64)), device=ctx.device)
    new_tokens = 8
    steps = cached_logits(model, {"input_ids": prompt})
    try:
        logits, tokens = [next(steps)], []
        start = time.perf_counter()
        for _ in range(new_tokens):
            tokens.append(int(logits[-1].argmax()))
            logits.append(steps.send(tokens[-1]))
        ctx.synchronize()
        seconds = (time.perf_counter() - start) / new_tokens
    finally:
        steps.close()
    sequence = torch.cat([prompt, torch.tensor([tokens], device=ctx.device)], dim=1)
    with torch.no_grad():
        want = _fp32_copy(model)(sequence)[0, prompt.shape[1] - 1 :]  # [new_tokens + 1, V]
    agree = sum(int(a) == b for a, b in zip(want.argmax(-1).tolist(), tokens))
    errors = {"logits": (relative_error(torch.stack(logits), want), MODEL_TOLERANCE)}
    note = f"prompt {prompt.shape[1]}, {new_tokens} steps; fp32 picks the same token at {agree}/{new_tokens}"
    return Outcome(errors, seconds, note)


# ----------------------------------------------------------------------------- dry run


def _measured_and_predicted_peaks(cfg, settings, ctx: Context) -> tuple[int, int]:
    """The dry run's device peak of ``cfg`` (two steps) and the peak ``torch.cuda`` measures
    over three steps of the same run for real (:class:`omnilong_full.MadeUpRun`), in bytes."""
    import omnilong_full
    from omnilong.dry_run import fake_tensors

    with fake_tensors("cuda"):
        dry = omnilong_full.DryRunRecipe(cfg, settings)
        try:
            dry.setup()
            predicted = max(step.peak for step in dry.train().steps)
        finally:
            dry.cleanup()
    ctx.free()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)  # a one-rank group of its own on a new port (init_distributed)
    before = torch.cuda.memory_allocated(ctx.device)
    real = omnilong_full.MadeUpRun(cfg, settings)
    try:
        real.setup()
        batches = real._batches()
        for _ in range(3):
            real._train_step([next(batches) for _ in range(cfg.gradient_accumulation_steps)])
        ctx.synchronize()
        measured = torch.cuda.max_memory_allocated(ctx.device) - before
    finally:
        real.cleanup()
    return predicted, measured


def check_dry_run_peak(ctx: Context) -> Outcome:
    """The dry run's predicted peak GPU memory against the peak measured over three real steps
    of the same run: the shipped Qwen2.5-VL-7B stage-1 config on one GPU with a 4-layer slice of
    the model (real dims), at 32K and 64K tokens."""
    if not ctx.cuda:
        raise Skip("needs CUDA (the measured side); tests/dry_run checks the dry run against a real CPU run")
    recipes = str(Path(__file__).resolve().parents[1] / "recipes")
    if recipes not in sys.path:
        sys.path.append(recipes)
    from omnilong.config_files import load_config, resolve_config
    from omnilong.dry_run import DryRunSettings
    from omnilong.models.named import named_model_config

    errors, notes = {}, []
    with tempfile.TemporaryDirectory() as checkpoint:
        config = named_model_config("qwen2.5-vl-7b")
        config["num_hidden_layers"] = 4
        Path(checkpoint, "config.json").write_text(json.dumps(config))
        for tokens in (32768, 65536):
            overrides = [f"checkpoint_dir={checkpoint}", f"output_dir={checkpoint}/out", f"max_seq_len={tokens}"]
            cfg = load_config(resolve_config("qwen2_5_vl_7b/stage1_text"), [*overrides, "device=cuda"])
            predicted, measured = _measured_and_predicted_peaks(cfg, DryRunSettings(1, longest=False), ctx)
            errors[f"peak_{tokens // 1024}k"] = (abs(predicted - measured) / measured, DRY_RUN_TOLERANCE)
            notes.append(
                f"{tokens // 1024}K: predicted {predicted / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB"
            )
    return Outcome(errors, note="4-layer 7B slice, stage-1 config, 1 GPU: " + "; ".join(notes))


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Context], Outcome]

    @property
    def about(self) -> str:
        return " ".join((self.run.__doc__ or "").split())


def _checks() -> list[Check]:
    attention = {
        "d128_causal": _decoder_rows,
        "d128_docs": _decoder_documents,
        "d80_windows": _vision_windows,
        "d72_images": _siglip_images,
    }
    return [
        *(Check(f"attn_{name}_bf16", _attention_check(layout, torch.bfloat16)) for name, layout in attention.items()),
        Check("loss_16k", _loss_check(16384)),
        Check("loss_64k", _loss_check(65536)),
        Check("ring_cp2", _ring_check(2)),
        Check("ring_cp4", _ring_check(4)),
        Check("offload_peak", check_offload_peak),
        Check("sync_layers", check_sync_layers),
        Check("sync_ring", check_sync_ring),
        Check("sync_decode", check_sync_decode),
        Check("sync_offload", check_sync_offload),
        Check("sync_loss", check_sync_loss),
        *(Check(f"attn_{name}_fp16", _attention_check(layout, torch.float16)) for name, layout in attention.items()),
        Check("liger_16k", _liger_check(16384)),
        Check("liger_64k", _liger_check(65536)),
        Check("vision_qwen", check_vision_qwen),
        Check("vision_siglip", check_vision_siglip),
        Check("decode", check_decode),
        Check("dry_run_peak", check_dry_run_peak),
    ]


CHECKS = _checks()
"""Every check, in the order they run (most important first)."""


def _one_line(error: BaseException) -> str:
    """``Type: first line of the message (at file:line)``: the innermost frame, below the one that
    caught ``error``, in OmniLong or in this file."""
    message = (str(error).strip().splitlines() or [""])[0][:300]
    below = traceback.extract_tb(error.__traceback__)[1:]
    frames = [f for f in below if "/omnilong/" in f.filename or f.filename == __file__]
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {message}{where}"


def run_check(check: Check, ctx: Context) -> Row:
    """One check, isolated: any exception is its FAIL row, and memory is freed after it."""
    start = time.perf_counter()
    outcome, status, note, trace = None, FAIL, "", ""
    try:
        outcome = check.run(ctx)
        ctx.synchronize()  # an asynchronous CUDA error belongs to this check
        status = PASS if outcome.passed else FAIL
        details = ", ".join(f"{name} {_number(error, '.1e')}" for name, (error, _) in outcome.errors.items())
        note = "; ".join(part for part in (outcome.failure, outcome.note, details) if part)
    except Skip as skip:
        status, note = SKIP, str(skip)
    except Exception as error:  # this check's failure, not the run's
        note, trace = _one_line(error), traceback.format_exc()
        traceback.clear_frames(error.__traceback__)  # let its tensors go
    try:
        ctx.free()
    except Exception as error:
        status, trace = FAIL, traceback.format_exc()
        note = "; ".join(part for part in (f"after the check: {_one_line(error)}", note) if part)
    worst = outcome.worst() if outcome else None
    return Row(
        check.name,
        status,
        worst[1] if worst else None,
        worst[2] if worst else None,
        outcome.seconds if outcome else None,
        time.perf_counter() - start,
        note,
        trace,
    )


def _cuda_usable(ctx: Context) -> bool:
    try:
        torch.ones(1, device=ctx.device).add_(1).sum().item()
        ctx.synchronize()
        return True
    except Exception:
        return False


def run_checks(checks: Sequence[Check], ctx: Context, budget_s: float, emit: Callable[[Row], None]) -> list[Row]:
    """Every check in order, each row passed to ``emit`` as soon as it is done; checks left when
    ``budget_s`` seconds have passed, or after a failure that left CUDA unusable, are SKIPPED."""
    start, rows, unusable = time.perf_counter(), [], ""
    for check in checks:
        elapsed = time.perf_counter() - start
        if unusable or elapsed >= budget_s:
            reason = unusable or f"time budget spent ({elapsed:.0f} s of {budget_s:.0f} s)"
            row = Row(check.name, SKIP, None, None, None, 0.0, reason)
        else:
            row = run_check(check, ctx)
            if row.status == FAIL and ctx.cuda and not _cuda_usable(ctx):
                unusable = f"CUDA unusable after {check.name}"
        rows.append(row)
        emit(row)
    return rows


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(ctx: Context) -> dict[str, Any]:
    """Where and when the checks ran."""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(ctx.device) if ctx.cuda else "CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "transformers": _version("transformers"),
        "liger": _version("liger-kernel"),
        "smoke": ctx.smoke,
        "fp32 matmul precision": torch.get_float32_matmul_precision(),
    }


def _number(value: float | None, digits: str) -> str:
    """``value`` formatted with ``digits``; an integer (a count) as it is."""
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else format(value, digits)


class Report:
    """The table: printed row by row, rewritten in ``out`` (markdown and JSON) after every row."""

    def __init__(self, env: dict[str, Any], out: Path | None):
        self.env, self.out, self.rows = env, out, []
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        size = "smoke shapes" if env["smoke"] else "real shapes"
        print(f"{self.title()}; {size}", flush=True)
        print(f"{'status':<6} {'check':<22} {'error':>8} {'tol':>8} {'time s':>9} {'wall s':>7}  note", flush=True)

    def title(self) -> str:
        env = self.env
        liger = f", liger {env['liger']}" if env["liger"] else ""
        return f"tools/gpu_check.py on {env['device']}, torch {env['torch']} (CUDA {env['cuda']}){liger}, {env['date']}"

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(
            f"{row.status:<6} {row.check:<22} {_number(row.error, '8.1e')} {_number(row.tolerance, '8.0e')} "
            f"{_number(row.seconds, '9.4f')} {row.wall_s:7.1f}  {row.note}",
            flush=True,
        )
        self.write()

    def summary(self) -> str:
        counts = {status: sum(row.status == status for row in self.rows) for status in (PASS, FAIL, SKIP)}
        wall = sum(row.wall_s for row in self.rows)
        return f"{len(self.rows)} checks: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; {wall:.0f} s"

    def markdown(self) -> str:
        lines = [
            f"{self.title()}: {self.summary()}",
            "",
            "| check | status | error | tolerance | time s | wall s | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            note = row.note.replace("|", "/")
            lines.append(
                f"| {row.check} | {row.status} | {_number(row.error, '.1e')} | {_number(row.tolerance, '.0e')} | "
                f"{_number(row.seconds, '.4f')} | {row.wall_s:.1f} | {note} |"
            )
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        if self.out is None:
            return
        (self.out / "gpu_check.md").write_text(self.markdown())
        data = {"environment": self.env, "summary": self.summary(), "rows": [asdict(row) for row in self.rows]}
        (self.out / "gpu_check.json").write_text(json.dumps(data, indent=1) + "\n")


def select(checks: Sequence[Check], only: Sequence[str] | None, skip: Sequence[str] | None) -> list[Check]:
    """The checks matching a pattern of ``only`` (all when ``None``) and none of ``skip``
    (shell-style patterns, e.g. ``attn_*``), in run order.

    Raises:
        ValueError: a pattern matches no check.
    """
    names = [check.name for check in checks]
    for pattern in [*(only or []), *(skip or [])]:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"no check matches {pattern!r} (see --list)")
    chosen = [c for c in checks if only is None or any(fnmatch.fnmatch(c.name, p) for p in only)]
    return [c for c in chosen if not any(fnmatch.fnmatch(c.name, p) for p in skip or [])]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for gpu_check.md and gpu_check.json")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these checks (patterns: 'attn_*')")
    parser.add_argument("--skip", nargs="+", metavar="NAME", help="leave these checks out (patterns)")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip the checks left after this many seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (on CPU: what the CPU allows)")
    args = parser.parse_args(argv)
    if args.list:
        for check in CHECKS:
            print(f"{check.name:<22} {check.about}")
        return 0
    try:
        checks = select(CHECKS, args.only, args.skip)
    except ValueError as error:
        parser.error(str(error))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA device: real shapes need a GPU; --smoke runs the tiny shapes on CPU")
    ctx = Context(device, args.smoke)
    report = Report(environment(ctx), args.out)
    rows = run_checks(checks, ctx, args.budget_s, report.add)
    print("\n" + report.markdown(), flush=True)
    return 1 if any(row.status == FAIL for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
