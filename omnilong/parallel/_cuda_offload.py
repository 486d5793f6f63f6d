"""The CUDA mover of :mod:`omnilong.parallel.activation_offload`: copies on one side stream
between the device and pinned host memory, ordered against the compute stream by events.
Imported only on CUDA."""

from typing import Any

import torch


class CudaMover:
    """Device <-> pinned host copies on a side stream of ``device``."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device=device)

    def to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Copy after the compute stream has produced ``tensor``; the caller keeps ``tensor``
        alive until :meth:`done`."""
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return host, event

    def done(self, token: Any) -> bool:
        return token is None or token.query()

    def to_device(self, host: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Copy on the side stream (after any copy to ``host`` queued there before)."""
        with torch.cuda.stream(self.stream):
            tensor = host.to(self.stream.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return tensor, event

    def ready(self, tensor: torch.Tensor, token: Any) -> None:
        """The compute stream waits for the copy; ``tensor``'s memory (allocated on the side
        stream) is not reused before the compute stream is done with it."""
        stream = torch.cuda.current_stream(tensor.device)
        stream.wait_event(token)
        tensor.record_stream(stream)
