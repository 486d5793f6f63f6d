"""Activation offload in a dry run: the real :class:`SavedTensorOffload` with a mover whose
host copies are counted as host memory by the dry run's tracker."""

from typing import Any

import torch

from omnilong.dry_run.memory import DeviceMemoryTracker
from omnilong.parallel.activation_offload import SavedTensorOffload


class DryRunMover:
    """Copies that complete at once (fake tensors take no time); the host copies are tagged
    ``"host"`` in ``tracker``."""

    def __init__(self, tracker: DeviceMemoryTracker):
        self.tracker = tracker

    def to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        with self.tracker.tagged_as("host"):
            host = torch.empty_like(tensor)
        host.copy_(tensor)
        return host, None

    def done(self, token: Any) -> bool:
        return True

    def to_device(self, host: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return host.clone(), None

    def ready(self, tensor: torch.Tensor, token: Any) -> None:
        pass


def dry_run_offload(tracker: DeviceMemoryTracker) -> SavedTensorOffload:
    """The activation offload of a run whose compute device the dry run's CPU stands for."""
    return SavedTensorOffload(torch.device("cpu"), DryRunMover(tracker))
