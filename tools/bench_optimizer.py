"""One AdamW step on the CPU over a shard of parameters, as each rank takes it with
``fsdp_cpu_offload``: torch's for-loop, foreach and fused implementations and, when
``deepspeed`` is importable, ``DeepSpeedCPUAdam`` (the optimizer of DeepSpeed ZeRO-3 with CPU
offload), side by side in one run.

The parameters are fp32, ``--numel`` in all (default 250M, ~4 GB with gradients and the two
moments), cut into ``--tensors`` tensors of equal size. Each implementation runs in a fresh
subprocess (its own memory, and no OpenMP runtime of another library spinning next to it:
DeepSpeed's op links its own). Reported: median seconds per step over ``--steps`` timed steps after one warm-up step,
and the ratio to the for-loop (torch's default for CPU parameters). OmniLong builds the
fused one (``omnilong.optimizer``).

Usage:
    .venv/bin/python tools/bench_optimizer.py [--numel 250000000] [--tensors 100] [--steps 5]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


def _implementations() -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    kwargs = dict(lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    impls = {
        "torch for-loop": lambda p: torch.optim.AdamW(p, foreach=False, **kwargs),
        "torch foreach": lambda p: torch.optim.AdamW(p, foreach=True, **kwargs),
        "torch fused (OmniLong)": lambda p: torch.optim.AdamW(p, fused=True, **kwargs),
    }
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except ImportError:
        return impls
    impls["DeepSpeedCPUAdam"] = lambda p: DeepSpeedCPUAdam(p, adamw_mode=True, **kwargs)
    return impls


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=250_000_000)
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    impls = _implementations()
    if args.child:
        print(json.dumps(_seconds_per_step(impls[args.child], args.numel, args.tensors, args.steps)))
        return
    print(f"AdamW step over {args.numel / 1e6:.0f}M fp32 parameters in {args.tensors} tensors, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads"
          + ("" if "DeepSpeedCPUAdam" in impls else "; deepspeed not importable: DeepSpeedCPUAdam not run"))
    print(f"{'implementation':<24} {'s/step':>8} {'x for-loop':>10}")
    base = None
    for name in impls:
        child = [sys.executable, __file__, "--numel", str(args.numel), "--tensors", str(args.tensors),
                 "--steps", str(args.steps), "--child", name]
        run = subprocess.run(child, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"{name} failed:\n{run.stderr[-3000:]}")
        seconds = json.loads(run.stdout.strip().splitlines()[-1])
        base = base or seconds
        print(f"{name:<24} {seconds:>8.3f} {seconds / base:>10.2f}")


if __name__ == "__main__":
    main()
