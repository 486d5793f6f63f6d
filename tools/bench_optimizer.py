"""One AdamW step on the CPU over a shard of parameters, as each rank takes it with
``fsdp_cpu_offload``: torch's for-loop, foreach and fused implementations and, when
``deepspeed`` is importable, ``DeepSpeedCPUAdam`` (the optimizer of DeepSpeed ZeRO-3 with CPU
offload), side by side in one run.

The parameters are fp32, ``--numel`` in all (default 250M, ~4 GB with gradients and the two
moments), cut into ``--tensors`` tensors of equal size. Each case runs in a fresh subprocess
(its own memory, and no OpenMP runtime of another library spinning next to it: DeepSpeed's op
links its own) with ``--threads`` CPU threads (default: every core this process may use, what
``cpu_threads_per_rank`` gives a single rank), plus the fused step on one thread: what torchrun's
``OMP_NUM_THREADS=1`` gives each of several ranks on a node when nothing overrides it. The cases
run in turn, ``--rounds`` times, so that a noisy machine slows them alike; reported: per case
the median over rounds of its median seconds per step (``--steps`` timed steps after one
warm-up), the range over rounds, and the ratio to DeepSpeedCPUAdam (else to the for-loop).

Usage:
    python tools/bench_optimizer.py [--numel 250000000] [--tensors 100] [--steps 5] [--rounds 3]
    # with DeepSpeedCPUAdam: run it with a Python that can import deepspeed (pip install deepspeed)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from omnilong.distributed import available_cores

_KWARGS = dict(lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)


def _deepspeed_cpu_adam():
    """``DeepSpeedCPUAdam``, or None when deepspeed is not importable."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except ImportError:
        return None
    return DeepSpeedCPUAdam


def _builders() -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    builders = {
        "torch for-loop": lambda p: torch.optim.AdamW(p, foreach=False, **_KWARGS),
        "torch foreach": lambda p: torch.optim.AdamW(p, foreach=True, **_KWARGS),
        "torch fused": lambda p: torch.optim.AdamW(p, fused=True, **_KWARGS),
    }
    adam = _deepspeed_cpu_adam()
    if adam is not None:
        builders["DeepSpeedCPUAdam"] = lambda p: adam(p, adamw_mode=True, **_KWARGS)
    return builders


def _seconds_per_step(make, numel: int, tensors: int, steps: int) -> float:
    size = numel // tensors
    params = [torch.nn.Parameter(torch.randn(size)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(size)
    optimizer = make(params)
    optimizer.step()  # warm-up: allocates the moments
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _run_case(args, builder: str, threads: int) -> float:
    """Seconds per step of ``builder`` on ``threads`` threads, measured in a fresh process."""
    child = [
        sys.executable,
        __file__,
        "--numel",
        str(args.numel),
        "--tensors",
        str(args.tensors),
        "--steps",
        str(args.steps),
        "--child",
        builder,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op pool and DeepSpeed's OpenMP
    run = subprocess.run(child, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(f"{builder} on {threads} threads failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=250_000_000)
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    builders = _builders()
    if args.child:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        print(json.dumps(_seconds_per_step(builders[args.child], args.numel, args.tensors, args.steps)))
        return
    cases = {f"{name}, {args.threads} threads": (name, args.threads) for name in builders}
    cases["torch fused, 1 thread"] = ("torch fused", 1)
    print(
        f"AdamW step over {args.numel / 1e6:.0f}M fp32 parameters in {args.tensors} tensors, torch "
        f"{torch.__version__}, {args.rounds} rounds of {args.steps} steps"
        + ("" if "DeepSpeedCPUAdam" in builders else "; deepspeed not importable: DeepSpeedCPUAdam not run")
    )
    seconds: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(args.rounds):
        for case, (builder, threads) in cases.items():
            seconds[case].append(_run_case(args, builder, threads))
    base_case = next((c for c in cases if c.startswith("DeepSpeedCPUAdam")), next(iter(cases)))
    base = statistics.median(seconds[base_case])
    print(f"{'case':<34} {'s/step':>8} {'range':>15} {'x ' + base_case.split(',')[0]:>20}")
    for case, values in seconds.items():
        median = statistics.median(values)
        print(f"{case:<34} {median:>8.3f} {min(values):>7.3f}-{max(values):<7.3f} {median / base:>20.2f}")


if __name__ == "__main__":
    main()
