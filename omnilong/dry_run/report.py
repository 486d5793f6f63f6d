"""What a dry run asks for (:class:`DryRunSettings`) and what it found (:class:`DryRunReport`)."""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnilong.hf_io import read_hf_config
from omnilong.memory_plan import GPU, GPUS, RESERVE_GIB, GiB
from omnilong.models.named import NAMED_MODELS, named_model_config

#: The named model of each shipped config folder, used when its checkpoint is not on this machine.
SHIPPED_MODELS = {"qwen2_5_vl_7b": "qwen2.5-vl-7b", "llava_ov_7b": "llava-onevision-7b"}


@dataclass(frozen=True)
class DryRunSettings:
    """A dry run of a config.

    Args:
        world_size: ranks of the job (``--nproc_per_node`` x ``--nnodes``).
        gpu: the GPU to fit (:data:`omnilong.memory_plan.GPUS`), its memory maybe overridden.
        mfu: the fraction of the GPU's peak bf16 throughput the step time is stated at.
        steps: training steps (the second has the optimizer's state, as every later one).
        model: a named model (:data:`omnilong.models.named.NAMED_MODELS`) for a checkpoint
            directory this machine does not have.
        longest: also find the longest ``max_seq_len`` that fits (one more, shorter step).
        config: the config file (a shipped one names its model: :data:`SHIPPED_MODELS`).
    """

    world_size: int
    gpu: GPU = GPUS["h100"]
    mfu: float = 0.4
    steps: int = 2
    model: str | None = None
    longest: bool = True
    config: Path | None = None

    def model_config(self, checkpoint_dir: Path) -> tuple[dict[str, Any], str]:
        """The ``config.json`` to build the model from, and where it came from: the checkpoint's
        when the directory has one, else ``model`` or the shipped config's named model.

        Raises:
            ValueError: no ``config.json`` and no model named (says how to name one).
        """
        if (checkpoint_dir / "config.json").is_file():
            return read_hf_config(checkpoint_dir), f"{checkpoint_dir / 'config.json'}"
        name = self.model
        if name is None and self.config is not None:
            name = SHIPPED_MODELS.get(self.config.parent.name)
        if name is None:
            raise ValueError(
                f"{checkpoint_dir} has no config.json: the dry run builds the model from it; pass "
                f"--model with one of {', '.join(NAMED_MODELS)} to use its shapes instead"
            )
        return named_model_config(name), f"the shapes of {name} shipped with OmniLong ({checkpoint_dir} not found)"


#: A loader worker's own memory once it has imported what it decodes with (torch, transformers,
#: torchvision, torchcodec, ``omnilong.data``), measured in a fresh process with torch 2.14.1:
#: ``Private_Dirty`` of ``/proc/self/smaps_rollup``, 396 MiB (of an RSS of 732 MiB; the other
#: 335 MiB are library pages every process shares). A spawned worker holds all of it; a forked
#: one shares it with its rank until written, so this counts it at most.
WORKER_BASELINE_BYTES = 396 * 2**20


@dataclass(frozen=True)
class LoaderMemory:
    """What a rank's DataLoader workers hold in host memory: ``workers`` processes, each with
    ``prefetch`` batches of ``batch_bytes`` (this rank's items as the dataset gives them: uint8
    pixels of its cp share, token rows) ahead of the step, and its own :data:`WORKER_BASELINE_BYTES`."""

    workers: int
    prefetch: int
    batch_bytes: int

    @property
    def total(self) -> int:
        return self.workers * (self.prefetch * self.batch_bytes + WORKER_BASELINE_BYTES)

    def format(self) -> str:
        return (
            f"host memory per rank of the data loader: {self.total / GiB:.2f} GiB = {self.workers} workers x "
            f"({self.prefetch} batch{'es' if self.prefetch > 1 else ''} ahead x {self.batch_bytes / GiB:.2f} GiB "
            f"+ {WORKER_BASELINE_BYTES / GiB:.2f} GiB of a worker's imports, measured)"
        )


@dataclass
class StepRecord:
    """One dry-run step: tokens per rank, peak device bytes by category, host bytes, FLOPs, seconds of CPU."""

    tokens: int
    device: dict[str, int]
    host: dict[str, int]
    flops: int
    seconds: float

    @property
    def peak(self) -> int:
        return sum(self.device.values())


@dataclass
class DryRunReport:
    """The findings of a dry run, for rank 0 (every rank holds the same shapes)."""

    config: str
    settings: DryRunSettings
    model_source: str
    mesh: str
    rows: str
    tokens_per_step: int  # over the whole job
    steps: list[StepRecord] = field(default_factory=list)
    shorter: StepRecord | None = None  # the extra step at fewer tokens (for the longest length)
    max_seq_len: int = 0
    length_multiple: int = 1024
    video_tokens: int = 0  # the vision tokens of the rows' video, which a longer row keeps as they are
    loader: LoaderMemory | None = None  # None: no loader workers

    @property
    def steady(self) -> StepRecord:
        """The step whose memory every later step repeats: the last one."""
        return self.steps[-1]

    @property
    def fits(self) -> bool:
        return max(s.peak for s in self.steps) <= self.settings.gpu.usable_bytes

    @property
    def step_seconds(self) -> float:
        """Seconds per step on the GPU at the stated MFU (FLOPs of the steady step)."""
        return self.steady.flops / (self.settings.gpu.bf16_tflops * 1e12 * self.settings.mfu)

    def longest_seq_len(self) -> int | None:
        """The longest ``max_seq_len`` whose peak fits: the peaks at two lengths extrapolated
        linearly (every per-token tensor grows with the row; the rest is fixed). None without
        the shorter step."""
        if self.shorter is None:
            return None
        full, short = max(self.steps, key=lambda s: s.peak), self.shorter
        slope = (full.peak - short.peak) / max(full.tokens - short.tokens, 1)  # bytes per token of a rank
        if slope <= 0:
            return None
        per_rank = full.tokens + (self.settings.gpu.usable_bytes - full.peak) / slope
        length = self.max_seq_len * per_rank / full.tokens
        return max(0, math.floor(length / self.length_multiple) * self.length_multiple)

    def format(self) -> str:
        s, gpu, steady = self.settings, self.settings.gpu, self.steady
        gib = lambda n: f"{n / GiB:7.2f} GiB"  # noqa: E731
        lines = [
            f"dry run of {self.config}: {s.world_size} ranks, mesh {self.mesh}",
            f"  model: {self.model_source}",
            f"  rows: {self.rows}",
            f"  per rank: {steady.tokens:,} tokens per step; {len(self.steps)} steps traced on fake tensors",
            "peak GPU memory per rank (bytes as the GPU holds them), by category:",
        ]
        peak_step = max(self.steps, key=lambda r: r.peak)
        for name, size in peak_step.device.items():
            lines.append(f"  {name:<16}{gib(size)}")
        lines.append(f"  {'total':<16}{gib(peak_step.peak)}   (step {self.steps.index(peak_step) + 1})")
        host = {k: v for k, v in steady.host.items() if v}
        if host:
            lines.append(
                "host memory per rank (offloaded): "
                + ", ".join(f"{name} {size / GiB:.2f} GiB" for name, size in host.items())
            )
        if self.loader is not None:
            lines.append(self.loader.format())
        lines += [
            f"FLOPs per step per rank: {steady.flops / 1e12:,.1f} TFLOP (recompute included)",
            f"step time at {s.mfu:.0%} of the {gpu.name}'s {gpu.bf16_tflops:g} bf16 TFLOP/s: {self.step_seconds:.2f} s"
            f"; {self.tokens_per_step / self.step_seconds:,.0f} tokens/s over the job"
            " (the host optimizer step and offload copies not counted)",
            f"fits a {gpu.name} ({gpu.memory_gib:g} GiB, {RESERVE_GIB:g} GiB kept for the CUDA context, NCCL "
            f"and fragmentation): {'yes' if self.fits else 'NO'}",
        ]
        longest = self.longest_seq_len()
        if longest is None and self.shorter is not None:
            lines.append(
                "longest max_seq_len that fits: not extrapolated (the peak did not grow from "
                f"{self.shorter.tokens:,} to {self.steady.tokens:,} tokens per rank: it is set by what every row has)"
            )
        elif longest is not None:
            rows = "the same video and more text, " if self.video_tokens else ""
            lines.append(
                f"longest max_seq_len that fits: {longest:,} ({rows}extrapolated from the peaks at two lengths)"
            )
        return "\n".join(lines)
