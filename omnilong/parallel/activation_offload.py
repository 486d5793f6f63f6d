"""Activation offload: the tensors autograd saves for the backward (under activation
checkpointing, each decoder layer's input) moved to host memory during the forward and
brought back, one ahead of use, during the backward.

With activation checkpointing a 28-layer 7B model at 128K tokens keeps 28 layer inputs
(0.94 GB each in bf16) on the GPU through the forward; offloaded, it keeps about one.

Mechanism: :func:`torch.autograd.graph.saved_tensors_hooks`. Non-reentrant checkpointing
saves a layer's inputs with an ordinary ``save_for_backward`` outside its own hooks, so these
hooks see them. A saved tensor is offloaded when it is on the compute device, needs a
gradient (an activation: rope tables, masks and position ids need none and are the same for
every layer, so they stay), is not a parameter and has at least ``min_bytes``; a tensor
saved by several ops is copied once. Its packed
form is a :class:`_Offloaded` handle; the backward meets the handles in reverse order of the
forward, and unpacking handle ``i`` starts bringing back handle ``i - 1``.

The copies themselves (pinned host memory, a side stream, events) are a *mover*: the CUDA
one lives in :mod:`omnilong.parallel._cuda_offload` and is imported only on CUDA. On CPU
there is nothing to move to: :func:`activation_offload` gives a context that does nothing.
"""

import contextlib
import weakref
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

MIN_OFFLOAD_BYTES = 1 << 20  # smaller saved tensors are not worth a copy


class Mover(Protocol):
    """Asynchronous copies between the compute device and host memory."""

    def to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying ``tensor`` to host memory; returns the host tensor and a token for :meth:`done`."""

    def done(self, token: Any) -> bool:
        """Whether the copy of :meth:`to_host` behind ``token`` has finished (never blocks)."""

    def to_device(self, host: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying ``host`` back to the device; returns the device tensor and a token for :meth:`ready`."""

    def ready(self, tensor: torch.Tensor, token: Any) -> None:
        """Make the compute stream wait for the copy of :meth:`to_device` behind ``token``."""


class _Offloaded:
    """A saved tensor in host memory (``host``), or still/again on the device (``device``)."""

    __slots__ = ("index", "host", "device", "token", "__weakref__")

    def __init__(self, index: int):
        self.index = index
        self.host: torch.Tensor | None = None
        self.device: torch.Tensor | None = None  # the original until its copy is done; then the copy back
        self.token: Any = None


class SavedTensorOffload:
    """``saved_tensors_hooks`` that offload activations through ``mover``; enter around the
    model's forward. Counts what it offloaded in ``offloaded`` and ``offloaded_bytes``."""

    def __init__(self, device: torch.device, mover: Mover, min_bytes: int = MIN_OFFLOAD_BYTES):
        self.device_type = torch.device(device).type
        self.mover = mover
        self.min_bytes = min_bytes
        self.offloaded = self.offloaded_bytes = 0
        self._handles: list[weakref.ReferenceType] = []
        self._copying: list[_Offloaded] = []  # handles whose device original waits for its copy to end
        self._seen: dict[int, tuple[weakref.ReferenceType, _Offloaded]] = {}  # id(tensor) -> its handle
        self._hooks: AbstractContextManager | None = None

    def __enter__(self) -> "SavedTensorOffload":
        self._handles, self._copying, self._seen = [], [], {}
        self.offloaded = self.offloaded_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks, self._seen = None, {}

    def _worth_offloading(self, tensor: torch.Tensor) -> bool:
        return (
            tensor.device.type == self.device_type
            and tensor.requires_grad
            and not isinstance(tensor, nn.Parameter)
            and tensor.numel() * tensor.element_size() >= self.min_bytes
        )

    def _pack(self, tensor: torch.Tensor) -> Any:
        self._release_copied()
        if not self._worth_offloading(tensor):
            return tensor
        seen = self._seen.get(id(tensor))
        if seen is not None and seen[0]() is tensor:  # saved again (e.g. by two ops): one copy
            return seen[1]
        handle = _Offloaded(len(self._handles))
        self._seen[id(tensor)] = (weakref.ref(tensor), handle)
        handle.host, handle.token = self.mover.to_host(tensor)
        handle.device = tensor
        self._copying.append(handle)
        self._handles.append(weakref.ref(handle))
        self.offloaded += 1
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        return handle

    def _release_copied(self) -> None:
        """Drop the device originals whose host copy has finished (their memory is free again)."""
        still = []
        for handle in self._copying:
            if self.mover.done(handle.token):
                handle.device = handle.token = None
            else:
                still.append(handle)
        self._copying = still

    def _fetch(self, handle: _Offloaded) -> None:
        if handle.device is None:
            handle.device, handle.token = self.mover.to_device(handle.host)

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Offloaded):
            return packed
        self._release_copied()
        if packed in self._copying:  # its copy to the host is still running: use the original
            self._copying.remove(packed)
            packed.token = None
        self._fetch(packed)
        if packed.token is not None:
            self.mover.ready(packed.device, packed.token)
            packed.token = None
        packed.host = None
        previous = self._handles[packed.index - 1]() if packed.index > 0 else None
        if previous is not None and previous.host is not None:
            self._fetch(previous)  # the next one the backward needs: its copy overlaps this layer's backward
        return packed.device


def activation_offload(enabled: bool, device: torch.device) -> AbstractContextManager:
    """The context to run the model's forward in: offloading activations to pinned host memory
    on CUDA when ``enabled``, else nothing (on CPU the activations are in host memory already)."""
    if not enabled or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from omnilong.parallel._cuda_offload import CudaMover  # CUDA only: never imported on CPU

    return SavedTensorOffload(device, CudaMover(device))
