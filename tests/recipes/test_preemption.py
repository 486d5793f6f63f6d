"""SIGTERM (SLURM's warning signal, a spot instance's notice) stops a run after a step that
every rank agrees on, with a checkpoint, and the same command with resume_from_checkpoint=true
continues it exactly.

Oracle: the same run uninterrupted (CPU, fp32, deterministic): per-step losses and gradient
norms equal and final weights bitwise equal.
"""

import os
import re
import signal
import subprocess
import time

import pytest
import torch

from omnilong.checkpoint.dcp_io import load_model_tensors
from tests.recipe_runs import OMNILONG, REPO, STAGE1, _args, metrics, recipe_run

pytestmark = pytest.mark.slow

RUN = {"max_seq_len": 128, "max_steps": 12, "dataset.max_files": 20, "save_every_n_steps": 100}


def test_sigterm_stops_every_rank_with_a_checkpoint_that_resumes_exactly(tiny_qwen_dir, shared_run, tmp_path):
    overrides = {"checkpoint_dir": tiny_qwen_dir, **RUN}
    ref = shared_run(STAGE1, overrides, 2)
    out = tmp_path / "out"
    cmd = [OMNILONG, "run", "--nproc_per_node", "2", "--config", STAGE1, *_args({**overrides, "output_dir": out})]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to each rank
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, output[-3000:]
    stopped = re.findall(r"stopped by SIGTERM after step (\d+); checkpoint written: (\S+);", output)
    assert len(stopped) == 1, output[-3000:]  # said once, by rank 0
    step, checkpoint = int(stopped[0][0]), stopped[0][1]
    assert 2 <= step < RUN["max_steps"] and checkpoint == str(out / f"checkpoints/step_{step}")
    assert [m["step"] for m in metrics(out)][-1] == step  # the stop step is logged, nothing after it

    resumed = recipe_run(STAGE1, {**overrides, "output_dir": out, "resume_from_checkpoint": "true"}, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {step}, epoch 0" in resumed.stderr
    assert [(m["loss"], m["grad_norm"]) for m in metrics(out)] == [(m["loss"], m["grad_norm"]) for m in metrics(ref)]
    last = f"checkpoints/step_{RUN['max_steps']}"
    final, expected = load_model_tensors(out / last), load_model_tensors(ref / last)
    assert final.keys() == expected.keys() and len(final) > 0
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
