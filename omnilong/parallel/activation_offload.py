"""Activation offload: the tensors autograd saves for the backward (under activation
checkpointing, each decoder layer's input) moved to host memory during the forward and
brought back, one ahead of use, during the backward.

With activation checkpointing a 28-layer 7B model at 128K tokens keeps 28 layer inputs
(0.94 GB each in bf16) on the GPU through the forward; offloaded, it keeps at most
:data:`KEPT_ON_DEVICE` of them at any time.

Mechanism: :func:`torch.autograd.graph.saved_tensors_hooks`. Non-reentrant checkpointing
saves a layer's inputs with an ordinary ``save_for_backward`` outside its own hooks, so these
hooks see them. A saved tensor is offloaded when it is on the compute device, needs a
gradient (an activation: rope tables, masks and position ids need none and are the same for
every layer, so they stay), is not a parameter and has at least ``min_bytes``; a tensor
saved by several ops is copied once. Its packed form is a :class:`_Offloaded` handle.

Ordered on the device, never by the host (the host runs many layers ahead of the GPU and
must not wait for it):

* forward: packing a tensor starts its copy to the host on a side stream and keeps the
  original in a window of the last :data:`KEPT_ON_DEVICE` packed tensors. A tensor leaving
  the window is dropped only after the compute stream has been made to wait for its copy;
  the original's memory belongs to the compute stream, so whatever reuses it is queued
  after that wait, after the copy has read it. Hence at most :data:`KEPT_ON_DEVICE`
  originals are held, however far ahead the host is.
* backward: the handles come back in reverse order. Unpacking one makes the compute stream
  wait for its copy back (started one unpack earlier) and starts bringing back the handle
  packed before it, so that copy overlaps this layer's backward: at most two copies back
  are alive. A handle still in the window at the end of the forward gives its original.

The copies themselves (pinned host memory, a side stream, events) are a *mover*: the CUDA
one lives in :mod:`omnilong.parallel._cuda_offload` and is imported only on CUDA. On CPU
there is nothing to move to: :func:`activation_offload` gives a context that does nothing.
"""

import contextlib
import weakref
from collections import deque
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

MIN_OFFLOAD_BYTES = 1 << 20  # smaller saved tensors are not worth a copy
# Offloaded tensors on the device at once: originals in the forward's window, copies back in
# the backward (the one in use, the one ahead). omnilong/memory_plan.py plans this many layers.
KEPT_ON_DEVICE = 2


class Mover(Protocol):
    """Asynchronous copies between the compute device and host memory, ordered against the
    compute stream (the stream current when a copy is started) on the device."""

    def to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying ``tensor`` to host memory after the work the compute stream has queued;
        returns the host tensor and a token for :meth:`wait`. The copy reads ``tensor`` until
        the compute stream has waited for it: keep ``tensor`` until :meth:`wait`."""

    def to_device(self, host: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying ``host`` into a new tensor of the compute stream's memory; returns it and
        a token for :meth:`wait`. Its contents are valid for the compute stream after
        :meth:`wait`; keep it until then."""

    def wait(self, token: Any) -> None:
        """Make the compute stream's later work wait for the copy behind ``token`` (the host does
        not wait)."""


class _Offloaded:
    """A saved tensor: ``host`` its host copy (until unpacked), ``device`` the original or the
    copy back, ``pending`` the token of a copy reading or writing ``device`` that the compute
    stream has not waited for yet, ``previous`` the handle packed before it (the one the
    backward needs next)."""

    __slots__ = ("host", "device", "pending", "previous", "__weakref__")

    def __init__(self, previous: "weakref.ReferenceType[_Offloaded] | None"):
        self.host: torch.Tensor | None = None
        self.device: torch.Tensor | None = None
        self.pending: Any = None
        self.previous = previous


class SavedTensorOffload:
    """``saved_tensors_hooks`` that offload activations through ``mover``; enter around the
    model's forward (once per forward: entering again releases what an earlier forward still
    held). Counts what it offloaded in ``offloaded`` and ``offloaded_bytes``."""

    def __init__(self, device: torch.device, mover: Mover, min_bytes: int = MIN_OFFLOAD_BYTES):
        self.device_type = torch.device(device).type
        self.mover = mover
        self.min_bytes = min_bytes
        self.offloaded = self.offloaded_bytes = 0
        self._window: deque[_Offloaded] = deque()  # handles holding their original, oldest first
        self._fetching: list[_Offloaded] = []  # handles whose copy back the compute stream has not waited for
        self._seen: dict[int, tuple[weakref.ReferenceType, _Offloaded]] = {}  # id(tensor) -> its handle
        self._last: weakref.ReferenceType[_Offloaded] | None = None
        self._hooks: AbstractContextManager | None = None

    def __enter__(self) -> "SavedTensorOffload":
        while self._window:  # a forward whose backward did not use them
            self._release(self._window.popleft())
        self._wait_fetches()
        self._seen, self._last = {}, None
        self.offloaded = self.offloaded_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks, self._seen, self._last = None, {}, None

    def _worth_offloading(self, tensor: torch.Tensor) -> bool:
        return (
            tensor.device.type == self.device_type
            and tensor.requires_grad
            and not isinstance(tensor, nn.Parameter)
            and tensor.numel() * tensor.element_size() >= self.min_bytes
        )

    def _pack(self, tensor: torch.Tensor) -> Any:
        if not self._worth_offloading(tensor):
            return tensor
        seen = self._seen.get(id(tensor))
        if seen is not None and seen[0]() is tensor:  # saved again (e.g. by two ops): one copy
            return seen[1]
        if len(self._window) == KEPT_ON_DEVICE:
            self._release(self._window.popleft())
        handle = _Offloaded(self._last)
        handle.host, handle.pending = self.mover.to_host(tensor)
        handle.device = tensor
        self._window.append(handle)
        self._seen[id(tensor)] = (weakref.ref(tensor), handle)
        self._last = weakref.ref(handle)
        self.offloaded += 1
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        return handle

    def _release(self, handle: _Offloaded) -> None:
        """Drop ``handle``'s original once the compute stream waits for its copy to the host:
        the compute stream may reuse its memory at once (no host sync)."""
        self.mover.wait(handle.pending)
        handle.pending = handle.device = None

    def _wait_fetches(self) -> None:
        for handle in self._fetching:
            self.mover.wait(handle.pending)
            handle.pending = None
        self._fetching = []

    def _fetch(self, handle: _Offloaded) -> None:
        handle.device, handle.pending = self.mover.to_device(handle.host)
        self._fetching.append(handle)

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Offloaded):
            return packed
        if packed.host is None:  # unpacked before (saved by several ops)
            return packed.device
        if packed in self._window:  # its original is still here: use it
            self._window.remove(packed)
        elif packed.device is None:  # not brought back ahead
            self._fetch(packed)
        self._wait_fetches()
        if packed.pending is not None:  # the original: its copy to the host must end before it is freed
            self.mover.wait(packed.pending)
            packed.pending = None
        packed.host = None
        previous = packed.previous() if packed.previous is not None else None
        if previous is not None and previous.device is None and previous.host is not None:
            self._fetch(previous)  # the next one the backward needs: its copy overlaps this layer's backward
        return packed.device


def activation_offload(enabled: bool, device: torch.device) -> AbstractContextManager:
    """The context to run the model's forward in: offloading activations to pinned host memory
    on CUDA when ``enabled``, else nothing (on CPU the activations are in host memory already)."""
    if not enabled or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from omnilong.parallel._cuda_offload import CudaMover  # CUDA only: never imported on CPU

    return SavedTensorOffload(device, CudaMover(device))
