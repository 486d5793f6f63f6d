"""Per-step training metrics: ``metrics.jsonl``, a progress bar, and torchtune's loggers."""

import json
import resource
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory of this process, or its peak resident set size on CPU, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def reset_host_peak_memory() -> int:
    """Reset this process's resident-set high-water mark to its current size (Linux:
    ``/proc/self/clear_refs``); return that size in bytes, the baseline for
    :func:`host_peak_memory`."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return _proc_status_bytes("VmRSS")


def host_peak_memory() -> int:
    """This process's resident-set high-water mark (VmHWM) in bytes."""
    return _proc_status_bytes("VmHWM")


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


class MetricsWriter:
    """Rank 0's sink for per-step metrics: one JSON object per line appended to
    ``<output_dir>/metrics.jsonl``, a tqdm bar, and an optional torchtune metric logger
    (TensorBoard, W&B, ...). Other ranks get an inactive writer."""

    def __init__(self, output_dir: Path, total_steps: int, active: bool, logger: Optional[Any] = None,
                 steps_done: int = 0):
        self.active = active
        self.logger = logger
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = tqdm(total=total_steps, initial=steps_done, desc="train", dynamic_ncols=True) if active else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.logger is not None:
            self.logger.log_dict(metrics, step=step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.logger is not None:
            self.logger.close()
