"""The CUDA mover of :mod:`omnilong.parallel.activation_offload`: copies on one side stream
between the device and pinned host memory, ordered against the compute stream by events.
Nothing here waits on the host (no ``synchronize``, ``query`` or ``record_stream``): the
memory a copy reads or writes stays the compute stream's, and the compute stream waits for
the copy's event before any later work of its own, so before that memory can be reused.
Imported only on CUDA."""

from typing import Any

import torch


class CudaMover:
    """Device <-> pinned host copies on a side stream of ``device``."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device=device)

    def to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Copy ``tensor`` into new pinned host memory once the compute stream has produced it."""
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
        return host, self._copy(host, tensor, torch.cuda.current_stream(tensor.device))

    def to_device(self, host: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Copy ``host`` into a new tensor allocated on the compute stream (its memory may have
        been freed by compute work still queued: the copy starts after that work)."""
        compute = torch.cuda.current_stream(self.stream.device)
        tensor = torch.empty(host.shape, dtype=host.dtype, device=self.stream.device)
        return tensor, self._copy(tensor, host, compute)

    def _copy(self, destination: torch.Tensor, source: torch.Tensor, compute: torch.cuda.Stream) -> Any:
        """The copy on the side stream after ``compute``'s queued work; the token is its event and
        ``compute``. The pinned buffer is kept by torch's host allocator until the copy ends."""
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            destination.copy_(source, non_blocking=True)
        event = torch.cuda.Event()
        event.record(self.stream)
        return event, compute

    def wait(self, token: Any) -> None:
        event, compute = token
        compute.wait_event(event)
