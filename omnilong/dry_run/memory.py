"""Peak GPU memory of a dry run's training step, by category, from PyTorch's FSDP2 memory
tracker (``torch.distributed._tools.fsdp2_mem_tracker``).

The dry run's tensors all live on a fake CPU mesh (:mod:`omnilong.dry_run.fake_world`), so the
tracker's one device holds what a GPU run keeps on the GPU and in host memory alike. What a
GPU run keeps on the host is taken out: with ``fsdp_cpu_offload`` the sharded parameters, their
gradients and the optimizer's state (and the optimizer step's temporaries); with activation
offload the host copies of the saved activations (tagged ``"host"`` when made). The peak is
the largest device total seen after any op, with its breakdown at that moment.

Added to what the tracker sees, because a CUDA kernel allocates it inside the op: the
workspace of the flash-attention varlen backward (its fp32 ``dq`` accumulator and softmax
statistics, and, for grouped-query attention, ``dk``/``dv`` expanded to every query head).
Not seen: the CUDA context, NCCL's buffers, cuBLAS workspaces and the caching allocator's
fragmentation; :data:`omnilong.memory_plan.RESERVE_GIB` keeps room for them when deciding whether a run fits.
"""

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch._guards import active_fake_mode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import _State

#: The categories of a report, each the tracker's categories it sums.
DEVICE_CATEGORIES = {
    "parameters": ("Sharded Param", "Unsharded Param", "Buffer", "All Gather"),
    "gradients": ("Sharded Grad", "Unsharded Grad", "Reduce Scatter"),
    "optimizer state": ("OptState",),
    "activations": ("Activation",),
    "temporaries": ("Temp",),
    "inputs": ("Inputs",),
}
_OFFLOADED = ("Sharded Param", "Sharded Grad", "OptState")  # on the host with fsdp_cpu_offload
_TOTAL = "Total"


def _flash_backward_workspace(args: tuple) -> int:
    """Bytes the flash-attention varlen backward allocates inside the kernel call
    (FlashAttention-2's ``mha_varlen_bwd``): ``dq_accum [H, Tq + 128 B, round32(D)]`` fp32,
    ``softmax_d [B, H, round128(max_q)]`` fp32 and, when key/value heads are fewer than query
    heads, ``dk``/``dv`` expanded to ``[Tk, H, D]`` in the inputs' dtype."""
    _, q, k, _, _, _, cu_q, _, max_q, *_ = args
    tokens_q, heads, dim = q.shape
    sequences = cu_q.shape[0] - 1
    dim_rounded = -(-dim // 32) * 32 if dim <= 128 else -(-dim // 64) * 64
    workspace = 4 * heads * (tokens_q + 128 * sequences) * dim_rounded + 4 * sequences * heads * (
        -(-max_q // 128) * 128
    )
    if k.shape[1] != heads:
        workspace += 2 * k.shape[0] * heads * dim * k.element_size()
    return workspace


class DeviceMemoryTracker(FSDPMemTracker):
    """:class:`FSDPMemTracker` that also keeps the peak of what a GPU would hold (see the
    module's docstring) and the bytes of tagged tensors.

    Args:
        model: the FSDP2 root module.
        optimizer: its optimizer.
        fsdp_cpu_offload: whether sharded parameters, gradients and optimizer state live on the host.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp_cpu_offload: bool):
        super().__init__(model, optimizer)
        self._host_categories = _OFFLOADED if fsdp_cpu_offload else ()
        self._tag: str | None = None
        self.tagged: dict[str, int] = {}  # tag -> live bytes
        self._tagged_storages: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.device_peak: dict[str, int] = {}  # bytes per category at the device's peak
        self.host_peak: dict[str, int] = {}  # bytes per category at the host's peak
        self._fake_mode_of_the_run = None

    @contextlib.contextmanager
    def tagged_as(self, tag: str) -> Iterator[None]:
        """Tensors made inside are counted under ``tag`` (``"host"``: held in host memory;
        ``"loss"``: the loss's buffers) for as long as they live."""
        previous, self._tag = self._tag, tag
        try:
            yield
        finally:
            self._tag = previous

    def tag_module(self, module: torch.nn.Module, tag: str) -> None:
        """Count what ``module``'s forward makes under ``tag`` (see :meth:`tagged_as`)."""
        tags: list[contextlib.AbstractContextManager] = []

        def enter(*_):
            tags.append(self.tagged_as(tag))
            tags[-1].__enter__()

        def leave(*_) -> None:
            tags.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)

    def __enter__(self) -> "DeviceMemoryTracker":
        self._fake_mode_of_the_run = active_fake_mode()
        return super().__enter__()

    def _track(self, reftype, t: torch.Tensor) -> None:
        if active_fake_mode() is not self._fake_mode_of_the_run:
            return  # DTensor's shape propagation in a fake mode of its own (torch 2.11's tracker counts it)
        if self._tag is not None:
            storage = t.untyped_storage()
            if storage not in self._tagged_storages:
                size = storage.nbytes()
                self._tagged_storages[storage] = self._tag
                self.tagged[self._tag] = self.tagged.get(self._tag, 0) + size
                weakref.finalize(storage, self._untag, self._tag, size)
        super()._track(reftype, t)

    def _untag(self, tag: str, size: int) -> None:
        self.tagged[tag] -= size

    def _update_peak_stats(self, peak_state: _State) -> None:
        """Called after every op: keeps the device's and the host's peaks (the tracker's own
        per-module peaks, which cost a walk over every module per op, are not kept)."""
        self._update_device_peak()

    def _update_device_peak(self, extra_temporary: int = 0) -> None:
        snapshot = next(iter(self._curr_mem_snap.values()), None)
        if snapshot is None:
            return
        by_name = {getattr(key, "value", key): value for key, value in snapshot.items()}
        host_total = sum(by_name.get(key, 0) for key in self._host_categories) + self.tagged.get("host", 0)
        device_total = by_name[_TOTAL] - host_total + extra_temporary
        if device_total > sum(self.device_peak.values()):
            self.device_peak = self._breakdown(by_name, extra_temporary, on_host=False)
        if host_total > sum(self.host_peak.values()):
            self.host_peak = {name: size for name, size in self._breakdown(by_name, 0, on_host=True).items() if size}

    def _breakdown(self, by_name: dict[str, int], extra_temporary: int, on_host: bool) -> dict[str, int]:
        """Bytes per report category of the device's (or the host's) share of a snapshot."""
        breakdown = {
            name: sum(by_name.get(key, 0) for key in keys if (key in self._host_categories) == on_host)
            for name, keys in DEVICE_CATEGORIES.items()
        }
        breakdown["loss"] = 0
        for storage, tag in list(self._tagged_storages.items()):
            winfo, _ = self._WINFO.get(storage, (None, None))
            if winfo is None:
                continue
            category = next(name for name, keys in DEVICE_CATEGORIES.items() if winfo.reftype.value in keys)
            if tag == "host" and not on_host:
                breakdown[category] -= winfo.mem_consumed
            elif tag == "host":
                breakdown["activations"] += winfo.mem_consumed
            elif not on_host:  # the loss's buffers, on the device
                breakdown[category] -= winfo.mem_consumed
                breakdown["loss"] += winfo.mem_consumed
        if not on_host:
            breakdown["temporaries"] += extra_temporary
        return breakdown

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._flash_attention_backward.default:
            self._update_device_peak(extra_temporary=_flash_backward_workspace(args))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _fsdp_param_group_post_backward(self, fsdp_mod, orig_post_backward):
        """The tracker's wrapper reads every parameter's unsharded tensor, which a group whose
        forward never ran (the vision tower in a text stage) does not have: such a group runs
        untracked (it has no gradient to reduce)."""
        tracked = super()._fsdp_param_group_post_backward(fsdp_mod, orig_post_backward)

        def post_backward(*args, **kwargs):
            group = fsdp_mod._get_fsdp_state()._fsdp_param_group
            if group is not None and any(not hasattr(p, "_unsharded_param") for p in group.fsdp_params):
                return orig_post_backward(*args, **kwargs)
            return tracked(*args, **kwargs)

        return post_backward
