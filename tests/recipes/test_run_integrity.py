"""A run's integrity, end to end (issue 24): a second run on a running run's output_dir is
refused naming the first one; a resume on other data is refused naming the difference; a
torn last line of metrics.jsonl is dropped on resume; a run that trains on nothing stops."""

import json
import os
import socket

import pytest
from omegaconf import OmegaConf

from omnilong.checkpoint.run_dir import RunLock
from omnilong.data import BadSampleError
from tests.recipe_runs import STAGE2, metrics, recipe_run

pytestmark = pytest.mark.slow

NORMAL = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
USER_ONLY = {"messages": [{"role": "user", "content": "hello there"}]}


def _chat_run(tiny_qwen_dir, output_dir, data, **extra):
    """Stage 2 on the chat samples of ``data`` (a JSONL file), one per row, in file order."""
    return {
        "checkpoint_dir": tiny_qwen_dir,
        "output_dir": output_dir,
        "batch_size": 1,
        "shuffle": "false",
        "save_every_n_steps": "null",
        "save_hf_at_end": "false",
        "dataset._component_": "omnilong.data.chat_dataset",
        "~dataset.max_files": None,
        "dataset.data_files": f"[{data}]",
        "dataset.packed": "false",
        **extra,
    }


def _write(path, samples):
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def _error(result) -> str:
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_a_second_run_on_a_locked_output_dir_is_refused_naming_the_first(tiny_qwen_dir, tmp_path):
    data = _write(tmp_path / "chat.jsonl", [NORMAL] * 4)
    out = tmp_path / "out"
    out.mkdir()
    lock = RunLock(out)  # this test's process plays the first run
    try:
        error = _error(recipe_run(STAGE2, _chat_run(tiny_qwen_dir, out, data, max_steps=1)))
    finally:
        lock.release()
    assert f"output_dir {out} is in use by another run (host {socket.gethostname()}, pid {os.getpid()})" in error
    assert recipe_run(STAGE2, _chat_run(tiny_qwen_dir, out, data, max_steps=1)).returncode == 0


def test_resume_on_other_data_is_refused_and_a_torn_metrics_line_is_dropped(tiny_qwen_dir, tmp_path):
    data = _write(tmp_path / "chat.jsonl", [NORMAL] * 4)
    out = tmp_path / "out"
    # no lr schedule: resuming with another max_steps is then no config change (it moves no lr)
    run = {**_chat_run(tiny_qwen_dir, out, data, max_steps=2, save_every_n_steps=1), "lr_scheduler": "None"}
    assert recipe_run(STAGE2, run).returncode == 0
    assert json.loads((out / "checkpoints/step_2/data.json").read_text())["rows"] == 4

    _write(data, [NORMAL] * 6)  # the same file, grown
    resume = {**run, "max_steps": 3, "resume_from_checkpoint": "true"}
    error = _error(recipe_run(STAGE2, resume))
    assert f"this run's data differs from what {out}/checkpoints/step_2/data.json records: rows (4 -> 6)" in error

    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.')  # the run was killed while writing step 3's record
    resumed = recipe_run(STAGE2, {**resume, "allow_config_change_on_resume": "true"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{out / 'metrics.jsonl'}: dropped its torn last line 3" in resumed.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


def test_a_run_that_trains_no_token_for_max_empty_steps_stops_naming_the_counts(tiny_qwen_dir, tmp_path):
    data = _write(tmp_path / "chat.jsonl", [NORMAL] + [USER_ONLY] * 5)
    out = tmp_path / "out"
    error = _error(recipe_run(STAGE2, _chat_run(tiny_qwen_dir, out, data, max_steps=6, max_empty_steps=2)))
    assert "stopped: 2 steps in a row trained no token on any rank (max_empty_steps=2); " in error
    assert [m["step"] for m in metrics(out)] == [1, 2]  # step 3 was refused before it trained


class _Steps:
    """The counters ``OmniLongFullRecipe._stop_on_unusable_data`` keeps, without a model."""

    def __init__(self, **cfg):
        self.cfg = OmegaConf.create({"max_empty_steps": 5, "max_skipped_share": 0.5, **cfg})
        self.empty_steps, self.rows_drawn, self.skipped_rows, self.num_skipped = 0, 0, 0, 0

    def step(self, trained_tokens, skipped_rows, rows):
        import omnilong_full

        self.num_skipped += skipped_rows
        omnilong_full.OmniLongFullRecipe._stop_on_unusable_data(self, trained_tokens, skipped_rows, rows)


def test_skipped_share_is_judged_from_the_20th_row_and_names_the_counts():
    steps = _Steps()
    for _ in range(4):  # 16 rows, 12 of them skipped: too few rows to judge
        steps.step(100.0, 3, 4)
    with pytest.raises(BadSampleError) as stopped:
        steps.step(100.0, 3, 4)
    assert str(stopped.value) == (
        "stopped: 15 of the 20 rows drawn in this run held an unusable sample (15 samples skipped in all), "
        "more than max_skipped_share=0.5: check the data, or raise max_skipped_share"
    )
    steps = _Steps(max_skipped_share=None, max_empty_steps=None)  # null: never
    for _ in range(10):
        steps.step(0.0, 4, 4)


def test_an_empty_step_between_trained_ones_starts_the_count_again():
    steps = _Steps(max_empty_steps=2)
    for tokens in (0.0, 10.0, 0.0, 10.0, 0.0):
        steps.step(tokens, 0, 4)
    with pytest.raises(BadSampleError, match=r"^stopped: 2 steps in a row trained no token on any rank"):
        steps.step(0.0, 0, 4)
