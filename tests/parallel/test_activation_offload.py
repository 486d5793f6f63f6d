"""Activation offload (``activation_offload``).

The offload's ordering is checked on CPU with a mover on a simulated side stream that the
host is always ahead of: a copy runs only when the compute stream is made to wait for it,
never on its own (``SimulatedStreamMover``). Checked: how many offloaded tensors are alive
on the "device" at once (at most ``KEPT_ON_DEVICE``, however far ahead the host is), that
no copy reads a freed original and no copy back is used before the compute stream waited
for it, and the order of copies and waits. Oracle for the numbers: the same model without
offload; the loss and every gradient must be bit-identical (offload moves tensors, it
computes nothing; a copy used too early gives NaN). The CUDA mover (pinned memory, side
stream, events) is checked on a GPU only; those tests skip without CUDA.
"""

import contextlib
import weakref

import pytest
import torch

from omnilong.models.qwen2_5_vl import Qwen2_5_VLTextArgs, qwen2_5_vl
from omnilong.parallel.activation_offload import KEPT_ON_DEVICE, SavedTensorOffload, activation_offload
from omnilong.parallel.fsdp import apply_activation_checkpointing

ARGS = dict(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=96, mrope_section=[1, 1, 2])


class SimulatedStreamMover:
    """A CPU mover whose copies wait on a side stream that runs only when the compute stream
    waits for a copy (:meth:`wait` runs that copy then), as on a GPU the host has run far ahead of.

    Until its copy runs, a destination holds NaN. A copy to the host whose original was freed
    before it ran (on a GPU its memory could have been reused) is listed in ``read_freed``.
    ``log`` has ``("to_host" | "to_device" | "wait to_host" | "wait to_device", n)``, n the
    copy's number in send order; ``alive`` the number of offloaded device tensors alive
    (originals given to :meth:`to_host`, tensors made by :meth:`to_device`) after each start.
    """

    def __init__(self):
        self.log, self.alive, self.read_freed = [], [], []
        self.hosts: list[torch.Tensor] = []
        self.device_tensors: list[weakref.ReferenceType] = []
        self._queued = {}  # token -> the copy, run by wait

    def number(self, host: torch.Tensor) -> int:
        return next(n for n, h in enumerate(self.hosts) if h is host)

    def live_device_tensors(self) -> int:
        return len({id(ref()) for ref in self.device_tensors if ref() is not None})

    def _started(self, kind: str, n: int, device_tensor: torch.Tensor, copy) -> tuple:
        self.device_tensors.append(weakref.ref(device_tensor))
        self.log.append((kind, n))
        self.alive.append(self.live_device_tensors())
        token = (kind, n)
        self._queued[token] = copy
        return token

    def to_host(self, tensor):
        n, host = len(self.hosts), torch.full_like(tensor, float("nan"), requires_grad=False)
        self.hosts.append(host)
        original = weakref.ref(tensor)

        def copy():
            if original() is None:
                self.read_freed.append(n)
            else:
                host.copy_(original().detach())

        return host, self._started("to_host", n, tensor, copy)

    def to_device(self, host):
        tensor = torch.full_like(host, float("nan"))
        return tensor, self._started("to_device", self.number(host), tensor, lambda: tensor.copy_(host))

    def wait(self, token):
        kind, n = token
        self.log.append((f"wait {kind}", n))
        self._queued.pop(token)()


def _step(model, tokens, context):
    with context:
        hidden = model(tokens, return_hidden=True)
    loss = hidden.float().pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _model(device="cpu", dtype=torch.float32, **args):
    torch.manual_seed(0)
    model = qwen2_5_vl(Qwen2_5_VLTextArgs(**{**ARGS, **args})).to(device=device, dtype=dtype)
    apply_activation_checkpointing(model)
    return model


def _assert_equal_grads(grads, ref_grads):
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name


def test_at_most_kept_on_device_offloaded_tensors_alive_with_copies_that_never_end_on_their_own():
    """6 checkpointed layers: their saved inputs, then the final norm's input and normalised
    input (its input is saved by two ops, copied once). Rope tables (no gradient) and weights
    stay. Alive counts include the model's own references (the layer input in use)."""
    args = dict(n_layers=6)
    tokens = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = _step(_model(**args), tokens, contextlib.nullcontext())
    mover = SimulatedStreamMover()
    offload = SavedTensorOffload(torch.device("cpu"), mover, min_bytes=2 * 48 * 32 * 4)  # a [2, 48, 32] fp32 activation
    model = _model(**args)
    with offload:
        hidden = model(tokens, return_hidden=True)
    forward_alive = list(mover.alive)
    loss = hidden.float().pow(2).mean()
    loss.backward()

    assert offload.offloaded == 6 + 2
    assert offload.offloaded_bytes == offload.offloaded * 2 * 48 * 32 * 4
    assert max(forward_alive) == KEPT_ON_DEVICE  # without the window: 1, 2, ..., 8
    assert max(mover.alive) == KEPT_ON_DEVICE  # the backward too: the copy back in use and the one ahead
    assert mover.read_freed == []
    assert torch.equal(loss.detach(), ref_loss)
    _assert_equal_grads({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, ref_grads)


def test_each_unpack_waits_for_its_copy_and_fetches_the_next_needed_tensor_ahead():
    """A chain of 4 ``sin``, each saving its input (handles 0..3). Forward: a tensor leaves the
    window of 2 once the compute stream waits for its copy. Backward: handles 3 and 2 are still
    in the window (their originals are used); handle i waits for its copy back, started when
    i + 1 was unpacked, and starts i - 1's."""
    mover = SimulatedStreamMover()
    offload = SavedTensorOffload(torch.device("cpu"), mover, min_bytes=1)
    unpack = offload._unpack
    offload._unpack = lambda packed: mover.log.append(("unpack", mover.number(packed.host))) or unpack(packed)
    x = torch.randn(8, requires_grad=True)
    with offload:
        h = x
        for _ in range(4):
            h = torch.sin(h)
    assert mover.log == [
        ("to_host", 0),
        ("to_host", 1),
        ("wait to_host", 0),
        ("to_host", 2),
        ("wait to_host", 1),
        ("to_host", 3),
    ]
    mover.log.clear()
    h.sum().backward()
    assert mover.log == [
        ("unpack", 3),
        ("wait to_host", 3),
        ("unpack", 2),
        ("wait to_host", 2),
        ("to_device", 1),
        ("unpack", 1),
        ("wait to_device", 1),
        ("to_device", 0),
        ("unpack", 0),
        ("wait to_device", 0),
    ]
    expected = (
        torch.cos(x)
        * torch.cos(torch.sin(x))
        * torch.cos(torch.sin(torch.sin(x)))
        * torch.cos(torch.sin(torch.sin(torch.sin(x))))
    )
    assert torch.allclose(x.grad, expected, rtol=1e-6, atol=1e-7)


def test_nothing_stays_on_the_device_across_steps():
    """Two steps with the same context (as the recipe enters it once per micro-batch): after
    each backward no offloaded device tensor is alive. A forward that is never backpropagated
    holds its window until the next forward enters, which releases it (after the wait)."""
    mover = SimulatedStreamMover()
    offload = SavedTensorOffload(torch.device("cpu"), mover, min_bytes=1)
    x = torch.randn(8, requires_grad=True)

    def forward():
        with offload:
            return torch.sin(torch.sin(torch.sin(x)))

    for _ in range(2):
        forward().sum().backward()
        assert mover.live_device_tensors() == 1  # x, held by the test
    mover.log.clear()
    dropped = forward()  # 3 handles: x, sin(x), sin(sin(x)); the last two stay in the window
    del dropped
    assert mover.live_device_tensors() == 1 + KEPT_ON_DEVICE
    forward()
    assert ("wait to_host", 8) in mover.log and ("wait to_host", 7) in mover.log  # released with their waits
    assert mover.read_freed == []


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
        SavedTensorOffload(torch.device("cpu"), SimulatedStreamMover(), min_bytes=48 * 32 * 4),
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


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory, side stream)")


@needs_cuda
def test_cuda_offload_keeps_a_bounded_number_of_tensors_without_host_sync():
    """A chain of 8 ``sin`` over 16 MiB tensors, forward and backward under
    ``set_sync_debug_mode("error")`` (any host sync raises). After the forward, memory above
    the start holds the output and at most ``KEPT_ON_DEVICE`` saved tensors (without offload:
    all 8); the gradient equals the one without offload (same kernels on the same values)."""
    device = torch.device("cuda")
    size = 16 << 20
    x = torch.randn(size // 4, device=device, requires_grad=True)

    def run(context):
        x.grad = None
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with context:
                h = x
                for _ in range(8):
                    h = torch.sin(h)
            held = torch.cuda.memory_allocated() - start
            h.sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        del h
        torch.cuda.synchronize()
        return held, x.grad.clone(), torch.cuda.memory_allocated() - start

    ref_held, ref_grad, _ = run(contextlib.nullcontext())
    offload = activation_offload(True, device)
    for _ in range(3):
        held, grad, after = run(offload)
        assert offload.offloaded == 8
        assert held <= (1 + KEPT_ON_DEVICE) * size < ref_held
        assert torch.equal(grad, ref_grad)
        assert after == x.grad.numel() * 4 * 2  # x.grad and its clone: nothing else stayed


@needs_cuda
def test_cuda_offload_lowers_the_peak_over_three_steps_with_the_same_gradients():
    """8 checkpointed layers, 4096 tokens, width 256, fp32: each layer input is 4 MiB
    (offloaded: >= 1 MiB). Peaks (``max_memory_allocated`` above the memory before the step),
    the highest of 3 steps, with and without offload. The forward's: inside the last layer
    without offload it holds all 8 layer inputs, with offload 2 in every layer (the rest,
    that layer's own work, is the same). The whole step's (inside a layer's backward) is lower
    too. Oracle for the gradients: the same model without offload; same kernels on the same
    values, within rtol 1e-5, atol 1e-6 (a wrong or stale tensor is off by far more)."""
    device = torch.device("cuda")
    args = dict(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, hidden_dim=256, mrope_section=[8, 12, 12])
    tokens = torch.randint(0, 64, (1, 4096), generator=torch.Generator().manual_seed(1)).to(device)
    layer_input = 4096 * 256 * 4

    def run(enabled):
        model = _model(device, **args)
        context = activation_offload(enabled, device)
        assert isinstance(context, SavedTensorOffload) == enabled
        forward_peaks, step_peaks = [], []
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            with context:
                hidden = model(tokens, return_hidden=True)
            torch.cuda.synchronize()
            forward_peaks.append(torch.cuda.max_memory_allocated() - start)
            loss = hidden.float().pow(2).mean()
            del hidden
            loss.backward()
            torch.cuda.synchronize()
            step_peaks.append(torch.cuda.max_memory_allocated() - start)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, max(forward_peaks), max(step_peaks), getattr(context, "offloaded", 0)

    ref_loss, ref_grads, ref_forward, ref_step, _ = run(False)
    loss, grads, forward, step, offloaded = run(True)
    assert offloaded == args["n_layers"] + 2
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert forward <= ref_forward - (args["n_layers"] - KEPT_ON_DEVICE - 1) * layer_input, (forward, ref_forward)
    assert step < ref_step, (step, ref_step)
