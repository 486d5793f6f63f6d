"""Dry runs: the recipe's real setup and training steps at full size on one CPU, on fake
tensors, with a fake process group of the job's world size (``omnilong run ... --dry-run``)."""

from omnilong.dry_run.batches import MadeUpRows
from omnilong.dry_run.fake_world import fake_tensors, init_fake_process_group
from omnilong.dry_run.flops import FlopCount
from omnilong.dry_run.memory import DeviceMemoryTracker
from omnilong.dry_run.offload import dry_run_offload
from omnilong.dry_run.report import DryRunReport, DryRunSettings, LoaderMemory, StepRecord

__all__ = [
    "DeviceMemoryTracker",
    "DryRunReport",
    "DryRunSettings",
    "FlopCount",
    "LoaderMemory",
    "MadeUpRows",
    "StepRecord",
    "dry_run_offload",
    "fake_tensors",
    "init_fake_process_group",
]
