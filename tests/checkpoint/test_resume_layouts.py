"""Resume under context parallelism with gradient accumulation, across an epoch boundary, with
shuffling: a run SIGKILLed after step 3 and resumed from its step-2 checkpoint is the run that
never stopped.

Five chat rows, 2 rows a step (cp_degree=2 on 2 processes, 2 micro-batches of 1 row): step 3
takes the last row of epoch 0 and the first of epoch 1, whose order is a new permutation.
AdamW with clipping, as shipped, so the optimizer state must come back too.

Oracle: the same run uninterrupted (CPU, fp32, deterministic): per-step losses, gradient norms
and token counts equal, final weights bitwise equal.

The generators' restore is checked in ``test_training_state_rng.py``, not here: the global
torch generator is drawn only by the DataLoader (one seed per iterator), and a resumed run starts
one more iterator (the rest of the interrupted epoch) than the run that never stopped, so their
generator states differ after a resume whether or not it restored them.
"""

import json
import os

import pytest
import torch

from omnilong.checkpoint.dcp_io import load_model_tensors
from omnilong.checkpoint.training_state import FAULT_ENV
from tests.recipe_runs import STAGE2, metrics, recipe_run

pytestmark = pytest.mark.slow

ROWS = [
    ("What is a list?", "A mutable sequence of items."),
    ("Hi", "Hello, how can I help you today?"),
    ("What does len do?", "It counts the items of a container."),
    ("Name a loop.", "for"),
    ("What is a dict?", "A mapping from hashable keys to values, kept in insertion order."),
]


def _run(checkpoint_dir, data, output_dir, fault=None, **extra):
    overrides = {
        "checkpoint_dir": checkpoint_dir,
        "output_dir": output_dir,
        "max_steps": 5,
        "shuffle": "true",
        "cp_degree": 2,
        "batch_size": 1,
        "gradient_accumulation_steps": 2,
        "save_every_n_steps": 2,
        "keep_last_n_checkpoints": 3,
        "dataset._component_": "omnilong.data.chat_dataset",
        "~dataset.max_files": None,
        "dataset.data_files": f"[{data}]",
        "dataset.packed": "false",
        **extra,
    }
    return recipe_run(STAGE2, overrides, nproc=2, env={**os.environ, FAULT_ENV: fault} if fault else None)


def _curve(output_dir):
    return [(m["step"], m["loss"], m["grad_norm"], m["num_tokens"]) for m in metrics(output_dir)]


def test_resume_under_cp_with_accumulation_across_an_epoch_boundary(tiny_qwen_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in ROWS
        )
    )
    ref = _run(tiny_qwen_dir, data, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert _run(tiny_qwen_dir, data, tmp_path / "run", fault="after_step@3").returncode != 0
    resumed = _run(tiny_qwen_dir, data, tmp_path / "run", resume_from_checkpoint="true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 2, epoch 0, 4 samples into it)" in resumed.stderr

    assert _curve(tmp_path / "run") == _curve(tmp_path / "ref")
    assert len({n for *_, n in _curve(tmp_path / "ref")}) > 1  # rows differ, so the order shows
    final, expected = (load_model_tensors(tmp_path / d / "checkpoints/step_5") for d in ("run", "ref"))
    assert final.keys() == expected.keys() and len(final) > 0
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
