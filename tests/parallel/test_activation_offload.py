"""Activation offload (``activation_offload``).

The offload bookkeeping (which saved tensors move, the order they come back in, one ahead)
is checked on CPU with a mover that copies into separate host tensors and logs its calls.
Oracle: the same model without offload; the loss and every gradient must be bit-identical
(offload moves tensors, it computes nothing). The CUDA mover (pinned memory, side stream,
events) is checked on a GPU only; the test skips without CUDA.
"""

import contextlib

import pytest
import torch

from omnilong.models.qwen2_5_vl import Qwen2_5_VLTextArgs, qwen2_5_vl
from omnilong.parallel.activation_offload import SavedTensorOffload, activation_offload
from omnilong.parallel.fsdp import apply_activation_checkpointing

ARGS = dict(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=96, mrope_section=[1, 1, 2])


class LoggingHostMover:
    """A mover on CPU: copies into fresh tensors (so a wrong handle gives wrong numbers) and
    logs ``("to_host" | "to_device", index of the copy in send order)``."""

    def __init__(self):
        self.log, self.hosts = [], []

    def to_host(self, tensor):
        self.log.append(("to_host", len(self.hosts)))
        self.hosts.append(tensor.detach().clone())
        return self.hosts[-1], "copied"

    def done(self, token):
        return True

    def to_device(self, host):
        self.log.append(("to_device", next(i for i, h in enumerate(self.hosts) if h is host)))
        return host.clone(), "fetched"

    def ready(self, tensor, token):
        assert token == "fetched"


def _step(model, tokens, context):
    with context:
        hidden = model(tokens, return_hidden=True)
    loss = hidden.float().pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _model(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = qwen2_5_vl(Qwen2_5_VLTextArgs(**ARGS)).to(device=device, dtype=dtype)
    apply_activation_checkpointing(model)
    return model


def test_layer_inputs_are_offloaded_and_come_back_in_reverse_with_identical_gradients():
    tokens = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = _step(_model(), tokens, contextlib.nullcontext())
    mover = LoggingHostMover()
    offload = SavedTensorOffload(torch.device("cpu"), mover, min_bytes=2 * 48 * 32 * 4)  # a [2, 48, 32] fp32 activation
    loss, grads = _step(_model(), tokens, offload)
    assert torch.equal(loss, ref_loss)
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    # Offloaded: the saved inputs of the 3 checkpointed layers, and the input and normalised
    # input of the final norm (not checkpointed; its input is saved by two ops, copied once).
    # Rope tables (no gradient) and weights stay.
    assert offload.offloaded == ARGS["n_layers"] + 2
    assert offload.offloaded_bytes == offload.offloaded * 2 * 48 * 32 * 4
    # All sent in the forward, each fetched once in the backward, last sent first back.
    assert mover.log == [("to_host", i) for i in range(5)] + [("to_device", i) for i in (4, 3, 2, 1, 0)]


def test_each_unpack_fetches_the_next_needed_tensor_ahead():
    """A chain of 4 ``sin``, each saving its input: the backward unpacks handles 3, 2, 1, 0;
    unpacking handle i fetches i (unless already fetched) and then i-1."""
    mover = LoggingHostMover()
    offload = SavedTensorOffload(torch.device("cpu"), mover, min_bytes=1)
    unpack = offload._unpack
    offload._unpack = lambda packed: mover.log.append(("unpack", packed.index)) or unpack(packed)
    x = torch.randn(8, requires_grad=True)
    with offload:
        h = x
        for _ in range(4):
            h = torch.sin(h)
    mover.log.clear()
    h.sum().backward()
    assert mover.log == [
        ("unpack", 3),
        ("to_device", 3),
        ("to_device", 2),
        ("unpack", 2),
        ("to_device", 1),
        ("unpack", 1),
        ("to_device", 0),
        ("unpack", 0),
    ]
    expected = (
        torch.cos(x)
        * torch.cos(torch.sin(x))
        * torch.cos(torch.sin(torch.sin(x)))
        * torch.cos(torch.sin(torch.sin(torch.sin(x))))
    )
    assert torch.allclose(x.grad, expected, rtol=1e-6, atol=1e-7)


def _fsdp_steps(rank, world_size):
    """On each of 2 gloo ranks: one forward + backward of the checkpointed model sharded with
    FSDP2, without and with offload; returns, for each, the loss, the full gradients (numpy)
    and how many tensors were offloaded."""
    from omnilong.parallel.fsdp import apply_fsdp
    from omnilong.parallel.mesh import ParallelDims, build_mesh

    mesh = build_mesh(ParallelDims.resolve(world_size), "cpu")
    tokens = torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(rank))
    results = []
    for context in (
        contextlib.nullcontext(),
        SavedTensorOffload(torch.device("cpu"), LoggingHostMover(), min_bytes=48 * 32 * 4),
    ):
        model = _model()
        apply_fsdp(model, mesh)
        loss, grads = _step(model, tokens, context)
        results.append(
            (loss.item(), {n: g.full_tensor().numpy() for n, g in grads.items()}, getattr(context, "offloaded", 0))
        )
    return results


def test_offload_under_fsdp2_gives_identical_gradients(run_distributed):
    """FSDP2's gathered parameters are not offloaded (they are parameters); the layer inputs are."""
    for (ref_loss, ref_grads, _), (loss, grads, count) in run_distributed(_fsdp_steps, 2):
        assert loss == ref_loss
        assert count == ARGS["n_layers"] + 2
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            assert (grads[name] == ref_grads[name]).all(), name


def test_the_switch_does_nothing_on_cpu():
    assert isinstance(activation_offload(True, torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(activation_offload(False, torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory, side stream)")
def test_cuda_offload_gives_the_same_gradients_and_a_lower_peak():
    """16K tokens: each layer input is 2 MiB (offloaded: >= 1 MiB). Tolerance 1e-6: CUDA
    attention backward may add in another order from run to run."""
    device = torch.device("cuda")
    tokens = torch.randint(0, 64, (1, 16384), generator=torch.Generator().manual_seed(1)).to(device)

    def run(enabled):
        model = _model(device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        context = activation_offload(enabled, device)
        assert isinstance(context, SavedTensorOffload) == enabled
        loss, grads = _step(model, tokens, context)
        torch.cuda.synchronize()
        return loss, grads, torch.cuda.max_memory_allocated() - before, getattr(context, "offloaded", 0)

    ref_loss, ref_grads, ref_peak, _ = run(False)
    loss, grads, peak, offloaded = run(True)
    assert offloaded == ARGS["n_layers"] + 2
    assert torch.allclose(loss, ref_loss, rtol=0, atol=1e-6)
    for name in ref_grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=0, atol=1e-6), name
    assert peak < ref_peak
