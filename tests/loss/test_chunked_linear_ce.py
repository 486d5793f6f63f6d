"""ChunkedLinearCrossEntropy equals cross-entropy on the full logits.

Oracle: :class:`FullLogitsCrossEntropy` (``F.cross_entropy(hidden @ weight.T)`` in fp32
on CPU), with autograd for the gradients of hidden and weight; for z-loss, its formula
``z * logsumexp(logits)^2`` per non-ignored token added to the oracle's loss.
Tolerance: max abs diff <= 1e-5 * max(1, max|expected|) in fp32 (a summed loss of ~150
is only exact to 1.5e-5). In bf16 the loss runs on bf16 inputs and is
compared with the fp32 oracle on the same (bf16-rounded) inputs: <= 5e-2 for the loss
(logits are rounded to bf16 before fp32 softmax, |logit| ~ 5, eps = 7.8e-3) and
<= 2e-2 * max|grad| for the gradients.
Under FSDP2 (2 gloo ranks, each with its own batch, gradients summed over ranks as
OmniLong configures FSDP) the gathered gradients equal the sum over ranks of the
single-process gradients.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omnilong.loss import ChunkedLinearCrossEntropy, FullLogitsCrossEntropy
from omnilong.loss.chunked_linear_ce import auto_chunk_size

VOCAB, DIM, IGNORE = 37, 16, -100
TOL = 1e-5


def _inputs(shape: tuple, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random hidden ``[*shape, DIM]``, weight ``[VOCAB, DIM]`` and labels ``shape``.

    The first 7 tokens are ignored (more than a chunk of 3), and one more in the middle.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, DIM, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(VOCAB, DIM, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(VOCAB, shape, generator=g)
    flat = labels.view(-1)
    flat[:7] = IGNORE
    flat[flat.numel() // 2 + 3] = IGNORE
    return hidden, weight, labels


def _loss_and_grads(loss_fn, hidden, weight, labels, grad_scale: float = 1.0):
    """The loss (first item for ``reduction="sum"``) and the grads of hidden and weight."""
    hidden.grad = weight.grad = None
    out = loss_fn(hidden, weight, labels)
    loss = out[0] if isinstance(out, tuple) else out
    (loss * grad_scale).backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


def _assert_close(actual, expected, tol: float = TOL):
    for a, e in zip(actual, expected):
        assert not a.isnan().any()
        assert (a.float() - e.float()).abs().max().item() <= tol * max(1.0, e.abs().max().item())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, None])
@pytest.mark.parametrize("shape", [(26,), (2, 13)], ids=["2d", "3d"])
def test_matches_full_logits(shape, chunk_size, reduction):
    # 26 tokens - 8 ignored = 18 trainable: chunk sizes 4 (does not divide 18), 3, 1, auto.
    hidden, weight, labels = _inputs(shape)
    got = _loss_and_grads(
        ChunkedLinearCrossEntropy(chunk_size, reduction=reduction), hidden, weight, labels, grad_scale=2.5
    )
    want = _loss_and_grads(FullLogitsCrossEntropy(reduction=reduction), hidden, weight, labels, grad_scale=2.5)
    _assert_close(got, want)


def test_sum_returns_num_tokens():
    hidden, weight, labels = _inputs((26,))
    loss_sum, num_tokens = ChunkedLinearCrossEntropy(3, reduction="sum")(hidden, weight, labels)
    assert num_tokens.item() == 18
    assert loss_sum.dtype == torch.float32


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_trainable_token_gives_zero_loss_and_grads(reduction):
    hidden, weight, labels = _inputs((10,))
    labels.fill_(IGNORE)
    loss, grad_hidden, grad_weight = _loss_and_grads(
        ChunkedLinearCrossEntropy(3, reduction=reduction), hidden, weight, labels
    )
    assert loss.item() == 0.0
    assert grad_hidden.abs().max().item() == 0.0 and grad_weight.abs().max().item() == 0.0


def test_z_loss_matches_formula():
    z = 1e-2
    hidden, weight, labels = _inputs((26,))

    def oracle(hidden, weight, labels):
        logits = hidden @ weight.t()
        mask = labels != IGNORE
        lse = torch.logsumexp(logits[mask], dim=-1)
        return (
            F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum") + z * lse.square().sum()
        ) / mask.sum()

    got = _loss_and_grads(ChunkedLinearCrossEntropy(4, z_loss=z), hidden, weight, labels)
    _assert_close(got, _loss_and_grads(oracle, hidden, weight, labels))


def test_tied_embedding_gradients_add_up():
    hidden_unused, weight, labels = _inputs((26,))
    tokens = torch.randint(VOCAB, (26,), generator=torch.Generator().manual_seed(1))

    def run(loss_fn):
        weight.grad = None
        hidden = torch.tanh(F.embedding(tokens, weight))  # the same parameter, twice
        loss_fn(hidden, weight, labels).backward()
        return (weight.grad.clone(),)

    _assert_close(run(ChunkedLinearCrossEntropy(4)), run(FullLogitsCrossEntropy()))


def test_bf16_inputs():
    hidden, weight, labels = _inputs((2, 13), dtype=torch.bfloat16)
    loss, grad_hidden, grad_weight = _loss_and_grads(ChunkedLinearCrossEntropy(4), hidden, weight, labels)
    hidden32 = hidden.detach().float().requires_grad_()
    weight32 = weight.detach().float().requires_grad_()
    want = _loss_and_grads(FullLogitsCrossEntropy(), hidden32, weight32, labels)
    assert loss.dtype == torch.float32
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    assert abs(loss.item() - want[0].item()) <= 5e-2
    for got, expected in zip((grad_hidden, grad_weight), want[1:]):
        assert (got.float() - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_auto_chunk_size_bounds_logits():
    assert auto_chunk_size(152064) == 512  # 512 * 152064 fp32 = 311 MB
    assert auto_chunk_size(32000) == 4096
    assert auto_chunk_size(2**28) == 1


def test_second_backward_raises():
    hidden, weight, labels = _inputs((26,))
    loss = ChunkedLinearCrossEntropy(4)(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


class _TinyLM(nn.Module):
    """Embedding -> linear -> tanh, with an output projection the loss is given."""

    def __init__(self, tied: bool):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Returns the hidden states ``[B, T, DIM]`` (the output layer is not applied)."""
        return torch.tanh(self.proj(self.tok_embeddings(tokens)))


def _batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    tokens = torch.randint(VOCAB, (2, 9), generator=g)
    labels = torch.randint(VOCAB, (2, 9), generator=g)
    labels[rank, :5] = IGNORE
    return tokens, labels


# name: (tied, output layer sharded on its own so that its weight stays a DTensor)
FSDP_CASES = {"root": (False, False), "root_tied": (True, False), "dtensor": (False, True)}


def _fsdp_worker(rank: int, world_size: int) -> dict:
    """Per case: max abs diff of the gathered gradients from the summed oracle's."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from omnilong.parallel.fsdp import sum_gradients_across_ranks

    torch.manual_seed(0)
    errors = {}
    for name, (tied, separate_output) in FSDP_CASES.items():
        model = _TinyLM(tied)
        reference = copy.deepcopy(model)
        for r in range(world_size):  # oracle: sum of every rank's single-process gradients
            tokens, labels = _batch(r)
            FullLogitsCrossEntropy()(reference(tokens), reference.output.weight, labels).backward()
        if separate_output:
            fully_shard(model.output)
        fully_shard(model)
        sum_gradients_across_ranks(model)
        tokens, labels = _batch(rank)
        hidden = model(tokens)
        weight = model.output.weight
        assert isinstance(weight, DTensor) == separate_output, type(weight)
        ChunkedLinearCrossEntropy(chunk_size=4)(hidden, weight, labels).backward()
        errors[name] = max(
            (p.grad.full_tensor() - ref.grad).abs().max().item()
            for p, ref in zip(model.parameters(), reference.parameters())
        )
    return errors


def test_fsdp2_gradients_match_single_process(run_distributed):
    for errors in run_distributed(_fsdp_worker, 2):
        assert errors.keys() == FSDP_CASES.keys()
        assert all(err <= TOL for err in errors.values()), errors


def test_weight_gradient_accumulates_over_chunks_in_fp32():
    """bf16 hidden, 256 chunks of 8 tokens: the fp32 weight gradient equals the fp32 oracle
    (same bf16-rounded inputs, one full-batch computation) within 1e-2 of its largest entry.
    Each chunk's gradient is rounded to bf16 before its GEMM (relative error ~4e-3, which does
    not grow with the chunk count); summing the chunks in a bf16 buffer instead rounds the
    running sum 256 times and fails this tolerance."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2048, 16, generator=g).bfloat16()
    weight = torch.randn(32, 16, generator=g).bfloat16().float().requires_grad_()
    labels = torch.randint(0, 32, (2048,), generator=g)
    loss, _ = ChunkedLinearCrossEntropy(chunk_size=8, reduction="sum")(hidden, weight, labels)
    loss.backward()
    reference = weight.detach().clone().requires_grad_()
    F.cross_entropy(hidden.float() @ reference.t(), labels, reduction="sum").backward()
    error = (weight.grad - reference.grad).abs().max() / reference.grad.abs().max()
    assert error <= 1e-2, error


def test_weight_gradient_buffer_is_reused_across_micro_batches():
    """A bf16 weight: the fp32 buffer is allocated once; the gradients still accumulate
    correctly in the parameter over two micro-batches."""
    loss_fn = ChunkedLinearCrossEntropy(chunk_size=4, reduction="sum")
    weight = torch.randn(8, 4).bfloat16().requires_grad_()
    batches = [(torch.randn(6, 4).bfloat16(), torch.randint(0, 8, (6,))) for _ in range(2)]
    buffers = []
    for hidden, labels in batches:
        loss_fn(hidden, weight, labels)[0].backward()
        buffers.append(loss_fn._grad_weight)
    assert buffers[0] is not None and buffers[0] is buffers[1]
    reference = weight.detach().float().requires_grad_()
    for hidden, labels in batches:
        F.cross_entropy(hidden.float() @ reference.t(), labels, reduction="sum").backward()
    torch.testing.assert_close(weight.grad.float(), reference.grad, atol=2e-2, rtol=2e-2)


def test_fused_chunk_function_equals_the_in_place_one():
    """The function compiled on CUDA (written without mutation) gives the same loss and
    gradient as the in-place one used on CPU (checked eagerly here; fp32, 1e-6)."""
    from omnilong.loss.chunked_linear_ce import _fused_softmax_cross_entropy_grad, softmax_cross_entropy_grad_

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(7, 50, generator=g) * 4, torch.randint(0, 50, (7,), generator=g)
    fused = _fused_softmax_cross_entropy_grad(logits, labels, torch.tensor(0.25), 1e-3, torch.float32)
    in_place = softmax_cross_entropy_grad_(logits.clone(), labels, 0.25, 1e-3, torch.float32)
    for a, b in zip(fused, in_place):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_fp32_oracle():
    """The CUDA path (bf16 GEMMs with fp32 output and accumulation, compiled chunk math,
    mean reduction over two batches of different token counts): loss within 1e-2 and
    gradients within 2e-2 of their largest entry, against fp32 full logits."""
    for tokens in (300, 77):
        g = torch.Generator().manual_seed(tokens)
        hidden = torch.randn(tokens, 64, generator=g).cuda().bfloat16().requires_grad_()
        weight = (torch.randn(1000, 64, generator=g) * 0.125).cuda().bfloat16().requires_grad_()
        labels = torch.randint(0, 1000, (tokens,), generator=g).cuda()
        loss = ChunkedLinearCrossEntropy(chunk_size=64)(hidden, weight, labels)
        loss.backward()
        h32, w32 = (x.detach().float().requires_grad_() for x in (hidden, weight))
        want = F.cross_entropy(h32 @ w32.t(), labels)
        want.backward()
        assert abs(loss.item() - want.item()) <= 1e-2
        for got, expected in ((hidden.grad, h32.grad), (weight.grad, w32.grad)):
            assert (got.float() - expected).abs().max() <= 2e-2 * expected.abs().max()
