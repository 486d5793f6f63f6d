"""Per-step training metrics: ``metrics.jsonl``, the console (a progress bar or plain lines), torchtune's loggers."""

import contextlib
import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from omnilong.logs import console_loggers

log = logging.getLogger("omnilong")


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
    ``<output_dir>/metrics.jsonl``, an optional torchtune metric logger (TensorBoard, W&B,
    ...) and the console: on a terminal a tqdm bar that advances every step (log records
    are written above it, never glued onto it), otherwise (a file, a cluster's log) one
    plain log line per logged step. Other ranks get an inactive writer.

    Args:
        output_dir: where ``metrics.jsonl`` is.
        total_steps: the run's last step.
        active: this is rank 0.
        logger: a torchtune metric logger, or None.
        steps_done: steps trained before (a resumed run).
        stream: the console; its ``isatty()`` picks the bar or plain lines.
    """

    def __init__(
        self,
        output_dir: Path,
        total_steps: int,
        active: bool,
        logger: Any | None = None,
        steps_done: int = 0,
        stream: TextIO = sys.stderr,
    ):
        self.active = active
        self.logger = logger
        self.path = Path(output_dir) / "metrics.jsonl"
        self.total_steps, self.first_step = total_steps, steps_done + 1
        self.last: dict[str, float] = {}  # the latest value of each metric
        self.tokens, self.start = 0, time.perf_counter()  # input tokens trained by this run, all ranks
        self.bar = None
        self._redirect = contextlib.ExitStack()
        if active and stream.isatty():
            self.bar = tqdm(total=total_steps, initial=steps_done, desc="train", dynamic_ncols=True, file=stream)
            self._redirect.enter_context(logging_redirect_tqdm(console_loggers()))

    def step_done(self, input_tokens: int) -> None:
        """One optimizer step of ``input_tokens`` (all ranks) is done: the bar advances."""
        self.tokens += input_tokens
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write ``metrics`` of ``step`` to ``metrics.jsonl``, the metric logger and the console."""
        if not self.active:
            return
        self.last.update(metrics)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.logger is not None:
            self.logger.log_dict(metrics, step=step)
        if self.bar is not None:
            self.bar.set_postfix({k: _short(k, metrics[k]) for k in _BAR_KEYS if k in metrics}, refresh=False)
        else:
            parts = [f"{k} {_short(k, metrics[k])}" for k in _LINE_KEYS if k in metrics]
            log.info("step %d/%d: %s", step, self.total_steps, ", ".join(parts))

    def summary(self, steps: int, checkpoint: Path | None, hf_dir: Path | None) -> None:
        """Log the end of the run: steps trained, final loss (and val loss), wall time,
        tokens/s, where the last checkpoint, the HF export and ``metrics.jsonl`` are."""
        if not self.active:
            return
        elapsed = time.perf_counter() - self.start
        lines = [f"done: {steps} steps in {elapsed:.1f} s ({self.tokens / max(elapsed, 1e-9):,.0f} tokens/s)"]
        lines += [f"  final {k}: {self.last[k]:.4f}" for k in ("loss", "val_loss") if k in self.last]
        lines.append(f"  last checkpoint: {checkpoint or 'none (save_every_n_steps is null)'}")
        lines.append(f"  Hugging Face export: {hf_dir or 'none (save_hf_at_end is false)'}")
        lines.append(f"  metrics: {self.path}")
        log.info("\n".join(lines))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._redirect.close()
        if self.logger is not None:
            self.logger.close()


_BAR_KEYS = ("loss", "val_loss", "lr", "grad_norm")
_LINE_KEYS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_sec", "peak_memory_gb", "num_skipped")


def _short(key: str, value: float) -> str:
    """A metric for the console: tokens/s whole, memory in 2 decimals, an lr in exponent form, others in 4 decimals."""
    if key == "tokens_per_sec":
        return f"{value:.0f}"
    if key == "peak_memory_gb":
        return f"{value:.2f}"
    if key == "lr":
        return f"{value:.2e}"
    return str(value) if isinstance(value, int) else f"{value:.4f}"
