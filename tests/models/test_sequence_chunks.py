"""Sequence-chunked norm + MLP (``mlp_chunk_size``).

Oracle: the same model unchunked, fp32 on CPU; tolerance 1e-5 (max abs diff) for the loss
and every parameter gradient, with and without activation checkpointing.
"""

import pytest
import torch

from omnilong.models.qwen2_5_vl import Qwen2_5_VLTextArgs, qwen2_5_vl
from omnilong.models.sequence_chunks import sequence_chunked, set_mlp_chunk_size
from omnilong.parallel.fsdp import apply_activation_checkpointing

ATOL = 1e-5
ARGS = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, mrope_section=[1, 1, 2])


def _loss_and_grads(chunk_size, checkpointing, tokens):
    torch.manual_seed(0)
    model = qwen2_5_vl(Qwen2_5_VLTextArgs(**ARGS))
    set_mlp_chunk_size(model, chunk_size)
    if checkpointing:
        apply_activation_checkpointing(model)
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_chunked_mlp_gives_the_unchunked_loss_and_gradients(checkpointing):
    tokens = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = _loss_and_grads(None, checkpointing, tokens)
    loss, grads = _loss_and_grads(7, checkpointing, tokens)  # 40 tokens: 5 chunks of 7 and one of 5
    assert torch.allclose(loss, ref_loss, rtol=0, atol=ATOL)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=0, atol=ATOL), name


def _saved_bytes(fn, x):
    """Bytes autograd saves for the backward of ``fn(x)``."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return total


def test_chunks_save_only_their_inputs_not_the_mlp_intermediates():
    """Unchunked, an MLP of hidden width H saves several [T, H] tensors; chunked, only the
    chunk inputs (slices of x, [T, D] in all) are saved: the intermediates are recomputed
    per chunk in the backward."""
    dim, hidden, tokens = 16, 256, 64
    mlp = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, dim))
    x = torch.randn(1, tokens, dim, requires_grad=True)
    whole = _saved_bytes(mlp, x)
    chunked = _saved_bytes(lambda v: sequence_chunked(mlp, v, 16), x)
    assert whole >= 2 * tokens * hidden * 4
    assert chunked <= tokens * dim * 4
    assert torch.equal(sequence_chunked(mlp, x, 16), mlp(x))


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="mlp_chunk_size must be a positive"):
        set_mlp_chunk_size(torch.nn.Module(), 0)
