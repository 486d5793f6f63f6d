"""Activation offload in a dry run: the real :class:`SavedTensorOffload` with a mover whose
host copies are counted as host memory by the dry run's tracker."""

from typing import Any

import torch

from omnilong.dry_run.memory import DeviceMemoryTracker
from omnilong.parallel.activation_offload import SavedTensorOffload


class DryRunMover:
    """The :class:`~omnilong.parallel.activation_offload.Mover` of a dry run: fake copies (the
    compute stream's waits are no-ops: there is one stream), the host copies tagged ``"host"``
    in ``tracker``. The offload's window decides, as on a GPU, how long originals stay."""

    def __init__(self, tracker: DeviceMemoryTracker):
        self.tracker = tracker

    def to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        with self.tracker.tagged_as("host"):
            host = torch.empty_like(tensor)
        host.copy_(tensor)
        return host, None

    def to_device(self, host: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return host.clone(), None

    def wait(self, token: Any) -> None:
        pass


def dry_run_offload(tracker: DeviceMemoryTracker) -> SavedTensorOffload:
    """The activation offload of a run whose compute device the dry run's CPU stands for."""
    return SavedTensorOffload(torch.device("cpu"), DryRunMover(tracker))
