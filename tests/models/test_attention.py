"""The one attention entry point: every place that attends (decoder, both vision towers, ring
steps, cached decoding) runs the kernel chosen in ``kernel_for``. Attention planned once per
batch: packed documents in one varlen call per layer, and no host sync inside a layer's
forward, recompute or backward.

Oracle for values: attention with an explicit ``T x T`` mask (causal and same document),
fp32, CPU math path (the ``masked_attention`` fixture); tolerance 1e-5 (max abs diff).
"""

from unittest import mock

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from omnilong.generation.kv_cache import CachedAttention, KVCache
from omnilong.models import attention as entry
from omnilong.models import varlen_attention
from omnilong.models.attention import CausalAttention, attention, document_segments, row_segments
from omnilong.models.blocks import DecoderLayer, FeedForward, GroupedQueryAttention
from omnilong.models.llava_onevision.vision import SiglipAttention
from omnilong.models.qwen2_5_vl import qwen2_5_vl
from omnilong.models.qwen2_5_vl.args import Qwen2_5_VLTextArgs
from omnilong.models.qwen2_5_vl.vision import VisionAttention, VisionBlock
from omnilong.models.varlen_attention import AttentionKernel, VarlenSegments, pack_tokens, unpack_tokens
from omnilong.parallel import plan_ring, ring_backward, ring_forward, run_local_ring

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# [2, 24]: row 0 holds four documents, row 1 two and padding (-1, as the model marks it).
DOCUMENTS = torch.tensor([[0] * 5 + [1] * 9 + [2] * 1 + [3] * 9, [0] * 16 + [1] * 5 + [-1] * 3])


def _qkv(hq: int, hkv: int, seq_len: int = 24, head_dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, seq_len, head_dim, generator=g)
    k, v = (torch.randn(2, hkv, seq_len, head_dim, generator=g) for _ in range(2))
    return q, k, v


def test_document_segments_are_the_runs_of_every_row():
    segments = document_segments(DOCUMENTS)
    assert segments.bounds == (
        (0, 5, 0, 5),
        (5, 14, 5, 14),
        (14, 15, 14, 15),
        (15, 24, 15, 24),
        (24, 40, 24, 40),
        (40, 45, 40, 45),
        (45, 48, 45, 48),
    )
    assert segments.cu_q.dtype == torch.int32 and segments.cu_q.tolist() == [0, 5, 14, 15, 24, 40, 45, 48]
    assert (segments.max_q, segments.causal) == (16, True)


def test_rows_of_one_document_need_no_plan():
    assert document_segments(torch.zeros(2, 7, dtype=torch.long)) is None


@pytest.mark.parametrize("heads", [(4, 4), (28, 4)])
def test_packed_documents_match_masked_attention(masked_attention, heads):
    """Forward and the gradients of q, k, v; GQA 28/4 as in Qwen2.5-VL-7B."""
    q, k, v = (x.requires_grad_() for x in _qkv(*heads))
    core = CausalAttention()
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    out = core(q, k, v, core.plan(None, DOCUMENTS))
    out.backward(dout)
    ref = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    expected = masked_attention(*ref, DOCUMENTS)
    expected.backward(dout)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    for got, want in zip((q, k, v), ref):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["CPU_FLASH", "EXACT"])
def test_kernels_match_masked_attention(masked_attention, kernel):
    """Each portable kernel on its own (EXACT runs on CUDA in fp32; its math is checked here):
    packed documents, GQA 28/4, forward with the log-sum-exp of the masked scores, and the
    backward given the forward's ``(out, lse)``."""
    kernel = getattr(varlen_attention, kernel)
    q, k, v = _qkv(28, 4)
    segments = document_segments(DOCUMENTS)
    packed = [pack_tokens(x) for x in (q, k, v)]
    out, lse = kernel.forward(*packed, segments)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = kernel.backward(dout, *packed, out, lse, segments)
    ref = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    expected = masked_attention(*ref, DOCUMENTS)
    expected.backward(unpack_tokens(dout, 2))
    visible = torch.ones(24, 24, dtype=torch.bool).tril() & (DOCUMENTS[:, :, None] == DOCUMENTS[:, None, :])
    scores = (q @ k.repeat_interleave(7, 1).transpose(-1, -2) / 8**0.5).masked_fill(~visible[:, None], float("-inf"))
    torch.testing.assert_close(unpack_tokens(out, 2), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, pack_tokens(scores.logsumexp(-1)[..., None])[..., 0].T, atol=1e-5, rtol=0)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(unpack_tokens(got, 2), want.grad, atol=1e-5, rtol=0)


def _tiny_text_model() -> torch.nn.Module:
    args = Qwen2_5_VLTextArgs(
        vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=48, mrope_section=[1, 1, 2]
    )
    torch.manual_seed(0)
    return qwen2_5_vl(args)


def test_the_model_plans_attention_once_per_batch():
    """With activation checkpointing, forward + recompute + backward of 3 layers call the
    planner once, and every layer's attention (6 calls) receives that same plan."""
    model = _tiny_text_model()
    for index, layer in enumerate(model.layers):
        model.layers[index] = checkpoint_wrapper(layer, preserve_rng_state=False)
    plans, received = [], []
    real_plan, real_forward = CausalAttention.plan, CausalAttention.forward

    def counting_plan(self, *args):
        plans.append(real_plan(self, *args))
        return plans[-1]

    def recording_forward(self, q, k, v, plan=None):
        received.append(plan)
        return real_forward(self, q, k, v, plan)

    with (
        mock.patch.object(CausalAttention, "plan", counting_plan),
        mock.patch.object(CausalAttention, "forward", recording_forward),
    ):
        model(torch.randint(0, 64, (2, 24)), document_ids=DOCUMENTS).sum().backward()
    assert len(plans) == 1 and plans[0] is not None
    assert len(received) == 6 and all(plan is plans[0] for plan in received)


def _layer(dim: int = 32) -> DecoderLayer:
    torch.manual_seed(0)
    return DecoderLayer(GroupedQueryAttention(dim, 4, 2, dim // 4, qkv_bias=True), FeedForward(dim, 48), dim, 1e-6)


def _rope(seq_len: int, head_dim: int, device="cpu"):
    angles = torch.arange(seq_len, device=device)[:, None] * torch.ones(head_dim, device=device)
    return angles.cos()[None].expand(2, -1, -1), angles.sin()[None].expand(2, -1, -1)


def test_a_decoder_layer_does_not_sync_with_the_host(no_host_sync):
    """Forward, checkpoint recompute and backward of a packed batch, after planning."""
    layer = checkpoint_wrapper(_layer(), preserve_rng_state=False)
    plan = layer.attention.core.plan(None, DOCUMENTS)
    x = torch.randn(2, 24, 32, requires_grad=True)
    with no_host_sync():
        layer(x, _rope(24, 8), plan).sum().backward()
    assert x.grad is not None


def test_the_guard_catches_a_host_sync(no_host_sync):
    """The guard itself: unplanned per-layer work that reads ids back fails inside it."""
    with no_host_sync(), pytest.raises(AssertionError, match="host sync"):
        document_segments(DOCUMENTS)


def test_ring_steps_do_not_sync_with_the_host(no_host_sync):
    """Two virtual cp ranks, packed documents: forward and backward after planning."""
    docs = [[[0, 0, 1, 1, 1, 2, 2, 2]], [[3, 3, 3, 3, 2, 2, 1, 1]]]

    def rank_fn(ring):
        steps = plan_ring(ring.rank, 2, docs, 1, 8, torch.device("cpu"))
        q, k, v = (torch.randn(8, h, 8) for h in (4, 2, 2))
        with no_host_sync():
            out, lse = ring_forward(q, k, v, steps, ring)
            ring_backward(torch.randn_like(out), q, k, v, out, lse, steps, ring)
        return True

    assert run_local_ring(2, rank_fn) == [True, True]


def _vision_segments(lengths: list[int], device) -> VarlenSegments:
    return VarlenSegments.from_lengths(lengths, lengths, causal=False, device=device)


def test_a_vision_block_does_not_sync_with_the_host(no_host_sync):
    """Window segments planned once per encode; the block itself reads nothing back."""
    torch.manual_seed(0)
    block = VisionBlock(VisionAttention(32, 4), FeedForward(32, 48, bias=True), 32)
    x = torch.randn(60, 32, requires_grad=True)
    segments = _vision_segments([16, 16, 8, 4, 16], x.device)
    rope = (torch.ones(60, 8), torch.zeros(60, 8))
    with no_host_sync():
        block(x, rope, segments).sum().backward()
    assert x.grad is not None


def test_vision_segments_match_masked_attention():
    """Bidirectional segment attention (runs of equal lengths batched) equals attention masked
    to the segments."""
    lengths = [16, 16, 8, 4, 16]
    q, k, v = (torch.randn(60, 4, 8) for _ in range(3))
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = segment[:, None] == segment[None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(0, 1) for x in (q, k, v)), attn_mask=mask
    ).transpose(0, 1)
    got = attention(q, k, v, _vision_segments(lengths, q.device))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _every_attention_site() -> dict[str, list[torch.Tensor]]:
    """Outputs and input gradients of every place that attends, on fixed inputs: a decoder layer
    (packed documents), the Qwen2.5-VL vision attention (windows), SigLIP's attention (images),
    the ring's steps (two virtual ranks, forward and backward) and a cached decode step."""
    torch.manual_seed(0)
    layer, x = _layer(), torch.randn(2, 24, 32, requires_grad=True)
    layer_out = layer(x, _rope(24, 8), layer.attention.core.plan(None, DOCUMENTS))
    layer_out.sum().backward()
    vision, xv = VisionAttention(32, 4), torch.randn(60, 32, requires_grad=True)
    vision_out = vision(xv, (torch.ones(60, 8), torch.zeros(60, 8)), _vision_segments([16, 16, 8, 4, 16], xv.device))
    vision_out.sum().backward()
    siglip, xs = SiglipAttention(32, 4), torch.randn(3, 9, 32, requires_grad=True)
    siglip_out = siglip(xs, row_segments(3, 9, causal=False, device=xs.device))
    siglip_out.sum().backward()

    def rank_fn(ring):
        g = torch.Generator().manual_seed(ring.rank)
        steps = plan_ring(
            ring.rank, 2, [[[0, 0, 1, 1, 1, 2, 2, 2]], [[3, 3, 3, 3, 2, 2, 1, 1]]], 1, 8, torch.device("cpu")
        )
        q, k, v = (torch.randn(8, h, 8, generator=g) for h in (4, 2, 2))
        out, lse = ring_forward(q, k, v, steps, ring)
        return out, ring_backward(torch.ones_like(out), q, k, v, out, lse, steps, ring)[2]

    ring = run_local_ring(2, rank_fn)
    cache = KVCache()
    core = CachedAttention(CausalAttention(), cache)
    q, k, v = _qkv(4, 2)
    core(q[:1], k[:1], v[:1], core.plan(torch.zeros(1, 24, dtype=torch.long), None))  # prefill
    cache.decoding = True
    decoded = core(q[1:, :, :1], k[1:, :, :1], v[1:, :, :1], core.plan(torch.zeros(1, 1, dtype=torch.long), None))
    return {
        "decoder": [layer_out, x.grad],
        "qwen2_5_vl vision": [vision_out, xv.grad],
        "siglip": [siglip_out, xs.grad],
        "ring": [t for rank in ring for t in rank],
        "decode": [decoded],
    }


def test_every_attention_goes_through_the_one_kernel_choice(monkeypatch):
    """The rule of the entry point: ``kernel_for`` is the one place a kernel is chosen. A kernel
    swapped in there (the real one attending ``2 v``: outputs exactly double) changes every
    place that attends; the ring's and the decode step's outputs are exactly doubled."""
    plain = _every_attention_site()
    real_kernel_for = entry.kernel_for

    def doubling_kernel_for(q):
        real = real_kernel_for(q)

        def backward(dout, q, k, v, out, lse, segments):
            dq, dk, dv = real.backward(dout, q, k, 2 * v, out, lse, segments)
            return dq, dk, 2 * dv

        return AttentionKernel(lambda q, k, v, segments: real.forward(q, k, 2 * v, segments), backward)

    monkeypatch.setattr(entry, "kernel_for", doubling_kernel_for)
    swapped = _every_attention_site()
    for site, tensors in plain.items():
        for before, after in zip(tensors, swapped[site]):
            assert not torch.allclose(before, after), f"{site} does not go through kernel_for"
    for site in ("ring", "decode"):
        torch.testing.assert_close(swapped[site][0], 2 * plain[site][0], atol=1e-5, rtol=0)


@CUDA
def test_on_cuda_layers_and_vision_blocks_never_sync(masked_attention):
    """bf16 on CUDA: one flash varlen call per layer, under ``set_sync_debug_mode("error")``,
    and the layer's attention matches the masked oracle (bf16 tolerance 2e-2)."""
    q, k, v = (x.cuda().bfloat16() for x in _qkv(28, 4))
    core = CausalAttention()
    plan = core.plan(None, DOCUMENTS.cuda())
    layer = checkpoint_wrapper(_layer().cuda().bfloat16(), preserve_rng_state=False)
    x = torch.randn(2, 24, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    block = VisionBlock(VisionAttention(32, 4), FeedForward(32, 48, bias=True), 32).cuda().bfloat16()
    xv = torch.randn(60, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    segments = _vision_segments([16, 16, 8, 4, 16], xv.device)
    rope = (torch.ones(60, 8, device="cuda"), torch.zeros(60, 8, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = core(q, k, v, plan)
        layer(x, tuple(r.bfloat16() for r in _rope(24, 8, "cuda")), plan).sum().backward()
        block(xv, rope, segments).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = masked_attention(*(t.float().cpu() for t in (q, k, v)), DOCUMENTS)
    assert (out.float().cpu() - expected).abs().max().item() <= 2e-2


def test_the_guard_leaves_nothing_behind_when_threads_overlap(no_host_sync):
    """Threads entering and leaving the guard in any order restore ``.tolist()``."""
    import threading

    inside = threading.Barrier(2)

    def enter_and_leave():
        with no_host_sync():
            inside.wait()

    threads = [threading.Thread(target=enter_and_leave) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.arange(3).tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("capability", "dtype", "refused"),
    [
        ((7, 5), torch.bfloat16, True),  # a T4: flash attention's kernels need 8.0
        ((7, 0), torch.float16, True),  # a V100
        ((8, 0), torch.bfloat16, False),  # an A100
        ((9, 0), torch.bfloat16, False),  # an H100
        ((7, 5), torch.float32, False),  # fp32 runs the exact kernel, which any GPU runs
    ],
)
def test_a_gpu_without_flash_attention_is_refused_before_any_work_naming_it(capability, dtype, refused):
    with (
        mock.patch.object(torch.cuda, "get_device_capability", return_value=capability),
        mock.patch.object(torch.cuda, "get_device_name", return_value="Tesla T4"),
    ):
        if refused:
            with pytest.raises(ValueError, match=r"Tesla T4 \(compute capability 7\.\d\).*8\.0 or newer"):
                entry.check_attention_device(torch.device("cuda", 0), dtype)
        else:
            entry.check_attention_device(torch.device("cuda", 0), dtype)
    entry.check_attention_device(torch.device("cpu"), torch.bfloat16)  # CPU is never asked about CUDA
