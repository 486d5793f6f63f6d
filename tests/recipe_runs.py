"""Launching the recipe as users do (`tune run [--nproc_per_node N] omnilong_full ...`) and
reading what it wrote: shared by the recipe, checkpoint and parity tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).parent / "tune")
STAGE1 = str(REPO / "configs/tiny/stage1_text.yaml")
STAGE2 = str(REPO / "configs/tiny/stage2_text_sft.yaml")
STAGE3 = str(REPO / "configs/tiny/stage3_video_sft.yaml")


def tune_run(config, overrides, nproc=1, timeout=300, **popen) -> subprocess.CompletedProcess:
    """``tune run`` of ``config`` with ``key=value`` overrides (``None`` value: the bare key)."""
    cmd = [TUNE, "run"] + (["--nproc_per_node", str(nproc)] if nproc > 1 else []) + ["omnilong_full", "--config", config]
    env = {**(popen.get("env") or os.environ), "OMP_NUM_THREADS": "1"}
    args = [k if v is None else f"{k}={v}" for k, v in overrides.items()]
    return subprocess.run(cmd + args, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=popen.get("cwd", REPO))


def metrics(output_dir) -> list[dict]:
    """The per-step records of ``output_dir/metrics.jsonl``."""
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
