"""Writing a checkpoint when the disk is full, when a symlink sits where it is written, and what
its config names; resuming with another ``max_steps``.

Oracles: the error text and the files left on disk (the earlier checkpoint passes
``verify_checkpoint``; a symlink's target is left untouched).
"""

import errno
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from omnilong.checkpoint.run_dir import check_resume_config
from omnilong.checkpoint.training_state import (
    CheckpointWriteError,
    save_training_state,
    verify_checkpoint,
)

TRAINER = {"step": 0, "epoch": 0, "consumed": 0, "num_skipped": 0}


def _save(output_dir, step, config=None):
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return save_training_state(
        output_dir, step, model, optimizer, None, {**TRAINER, "step": step}, OmegaConf.create(config or {}), 2, "run"
    )


def _full_disk_write(self, plan, planner):
    """A write that fills the disk half-way through a data file."""
    (Path(self.path) / "__0_0.distcp").write_bytes(b"\0" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")


def _save_on_a_full_disk(rank, world_size, output_dir):
    _save(output_dir, 1)
    FileSystemWriter.write_data = _full_disk_write
    try:
        _save(output_dir, 2)
    except CheckpointWriteError as e:
        return str(e)
    return None


def test_full_disk_is_named_and_the_partial_checkpoint_removed(run_distributed, tmp_path):
    errors = run_distributed(_save_on_a_full_disk, 2, tmp_path)
    root = tmp_path / "checkpoints"
    for error in errors:  # every rank stops with the same line
        assert error == (
            f"cannot write the checkpoint of step 2 (no space left on {root}); {root / 'step_2.tmp'} removed, "
            f"the previous checkpoint {root / 'step_1'} is kept"
        )
    assert sorted(p.name for p in root.iterdir()) == ["step_1"]
    verify_checkpoint(root / "step_1")


def _save_through_symlink(rank, world_size, output_dir, target):
    (Path(output_dir) / "checkpoints").mkdir(parents=True)
    (Path(output_dir) / "checkpoints/step_1.tmp").symlink_to(target)
    with pytest.raises(CheckpointWriteError) as refused:
        _save(output_dir, 1)
    return str(refused.value)


def test_a_symlink_in_place_of_the_partial_folder_is_never_followed(run_distributed, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("kept")
    (error,) = run_distributed(_save_through_symlink, 1, tmp_path / "out", target)
    assert f"{tmp_path / 'out/checkpoints/step_1.tmp'} is a symlink, not a checkpoint folder" in error
    assert [p.name for p in target.iterdir()] == ["precious.txt"]  # nothing written into, nothing removed
    assert (target / "precious.txt").read_text() == "kept"


def _save_with_relative_paths(rank, world_size, output_dir, cwd):
    import os

    os.chdir(cwd)
    return str(_save(output_dir, 1, {"checkpoint_dir": "models/base", "max_steps": 10}))


def test_step_folder_config_names_the_model_folder_absolutely_and_resumes_from_anywhere(run_distributed, tmp_path):
    (tmp_path / "work").mkdir()
    step = Path(run_distributed(_save_with_relative_paths, 1, tmp_path / "out", tmp_path / "work")[0])
    saved = OmegaConf.load(step / "config.yaml")
    assert saved.checkpoint_dir == str(tmp_path / "work/models/base")
    # resumed from another directory, naming the same folder by its absolute path: accepted
    cfg = OmegaConf.create({"checkpoint_dir": str(tmp_path / "work/models/base"), "max_steps": 10})
    cfg.allow_config_change_on_resume = False
    check_resume_config(step, cfg)


def _saved_run(tmp_path, max_steps, lr_scheduler):
    step = tmp_path / "step_4"
    step.mkdir()
    OmegaConf.save(OmegaConf.create({"max_steps": max_steps, "lr_scheduler": lr_scheduler}), step / "config.yaml")
    return step


SCHEDULE = {"_component_": "omnilong.lr_schedules.cosine_schedule_with_warmup", "num_warmup_steps": 2}


def test_changed_max_steps_with_an_lr_schedule_is_refused_naming_both(tmp_path):
    step = _saved_run(tmp_path, 80, SCHEDULE)
    cfg = OmegaConf.create({"max_steps": 100, "lr_scheduler": SCHEDULE, "allow_config_change_on_resume": False})
    with pytest.raises(ValueError, match=r"differs from .*config.yaml in max_steps \(80 -> 100\)"):
        check_resume_config(step, cfg)


def test_changed_max_steps_allowed_is_a_warning_naming_both(tmp_path, caplog):
    step = _saved_run(tmp_path, 80, SCHEDULE)
    cfg = OmegaConf.create({"max_steps": 100, "lr_scheduler": SCHEDULE, "allow_config_change_on_resume": True})
    with caplog.at_level(logging.WARNING, logger="omnilong"):
        check_resume_config(step, cfg)
    assert "max_steps changed from 80" in caplog.text and "to 100" in caplog.text


def test_changed_max_steps_without_an_lr_schedule_is_accepted(tmp_path):
    step = _saved_run(tmp_path, 80, None)
    check_resume_config(
        step, OmegaConf.create({"max_steps": 100, "lr_scheduler": None, "allow_config_change_on_resume": False})
    )
