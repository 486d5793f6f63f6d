"""The lock a run holds on its output_dir: a second run is refused naming the first one's host
and pid; a run killed with SIGKILL leaves nothing that blocks the next; overwrite_output_dir
never moves a running run aside."""

import multiprocessing
import os
import signal
import socket
import time

import pytest
from omegaconf import OmegaConf

from omnilong.checkpoint.run_dir import RunLock, check_not_in_use, prepare_output_dir


def _hold(output_dir, ready):
    RunLock(output_dir)
    ready.set()
    time.sleep(60)


@pytest.fixture
def holder(tmp_path):
    """Another process that holds the lock on ``tmp_path / "out"`` until it is killed."""
    ctx = multiprocessing.get_context("fork")
    out = tmp_path / "out"
    out.mkdir()
    ready = ctx.Event()
    process = ctx.Process(target=_hold, args=(out, ready))
    process.start()
    assert ready.wait(30)
    yield process
    process.kill()
    process.join(30)


def _cfg(out, **extra):
    return OmegaConf.create({"output_dir": str(out), "overwrite_output_dir": False, **extra})


def test_a_second_run_is_refused_naming_the_first_ones_host_and_pid(tmp_path, holder):
    out = tmp_path / "out"
    message = f"output_dir {out} is in use by another run (host {socket.gethostname()}, pid {holder.pid})"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunLock(out)
    with pytest.raises(ValueError, match=f"pid {holder.pid}"):
        check_not_in_use(out)  # the probe every rank makes before setup
    with pytest.raises(ValueError, match=f"pid {holder.pid}"):
        prepare_output_dir(_cfg(out), saves_checkpoints=True)


def test_a_run_killed_with_sigkill_does_not_block_the_next(tmp_path, holder):
    out = tmp_path / "out"
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    assert holder.exitcode == -signal.SIGKILL
    check_not_in_use(out)
    moved, lock = prepare_output_dir(_cfg(out), saves_checkpoints=True)
    assert moved is None and f'"pid": {os.getpid()}' in (out / ".run.lock").read_text()
    lock.release()


def test_overwrite_output_dir_does_not_move_a_running_run(tmp_path, holder):
    out = tmp_path / "out"
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match=f"pid {holder.pid}"):
        prepare_output_dir(_cfg(out, overwrite_output_dir=True), saves_checkpoints=False)
    assert (out / "metrics.jsonl").is_file() and not (tmp_path / "out.old-1").exists()


def test_overwrite_output_dir_moves_a_finished_run_and_locks_the_new_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    RunLock(out).release()  # a finished run's lock file stays behind, unlocked
    moved, lock = prepare_output_dir(_cfg(out, overwrite_output_dir=True), saves_checkpoints=False)
    assert moved == tmp_path / "out.old-1" and (moved / "metrics.jsonl").is_file()
    ctx = multiprocessing.get_context("fork")
    probe = ctx.Process(target=check_not_in_use, args=(out,))  # another process sees the new lock
    probe.start()
    probe.join(30)
    assert probe.exitcode == 1
    lock.release()
