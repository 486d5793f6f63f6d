"""Launching the recipe as users do (`omnilong run [--nproc_per_node N] --config ...`, or `tune
run [--nproc_per_node N] omnilong_full --config ...`), or its command line in this process for
configs it refuses at once, and reading what a run wrote: shared by the recipe, checkpoint and
parity tests."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.fork_server import adopt, fork_server_context

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).parent / "tune")
OMNILONG = str(Path(sys.executable).parent / "omnilong")
STAGE1 = str(REPO / "configs/tiny/stage1_text.yaml")
STAGE2 = str(REPO / "configs/tiny/stage2_text_sft.yaml")
STAGE3 = str(REPO / "configs/tiny/stage3_video_sft.yaml")
# 3 steps of 128 tokens of stage 1, fp32, one process: the run several tests compare with (with
# ``checkpoint_dir``, through the ``shared_run`` fixture).
SMALL_STAGE1 = {"max_seq_len": 128, "max_steps": 3, "dataset.max_files": 20, "shuffle": "false"}


def _args(overrides: dict) -> list[str]:
    """``key=value`` command-line overrides; a ``None`` value gives the bare key (``~key``: delete it)."""
    return [k if v is None else f"{k}={v}" for k, v in overrides.items()]


def recipe_run(config, overrides, nproc=1, launcher=None, timeout=300, **popen) -> subprocess.CompletedProcess:
    """The recipe on ``config`` with ``key=value`` overrides (``None`` value: the bare key) on
    ``nproc`` processes, launched by ``launcher``:

    - ``"omnilong"``: ``omnilong run`` in a new process; ``"tune"``: ``tune run`` (which starts
      about 3 s later: it imports torchtune). Both launch the recipe the same way.
    - ``None`` (most tests): ``omnilong run`` for several processes; for one, ``omnilong run``'s
      ``main`` in a process forked from the session's fork server (``tests/fork_server.py``),
      which has imported the recipe: the same run, 3-4 s sooner.
    """
    env = {**(popen.get("env") or os.environ), "OMP_NUM_THREADS": "1"}
    cwd = popen.get("cwd", REPO)
    torchrun = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    if launcher is None and nproc == 1:
        return _forked_omnilong(["run", "--config", config, *_args(overrides)], env, cwd, timeout)
    if launcher == "tune":
        cmd = [TUNE, "run", *torchrun, "omnilong_full", "--config", config]
    else:
        cmd = [OMNILONG, "run", *torchrun, "--config", config]
    return subprocess.run(cmd + _args(overrides), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def _forked_omnilong(argv: list[str], env: dict, cwd, timeout: float) -> subprocess.CompletedProcess:
    """``omnilong <argv>`` in a process forked from the fork server, with ``env`` and ``cwd``:
    its exit status (negative: the signal that killed it) and its output, as ``subprocess.run``
    reports them."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        child = fork_server_context().Process(target=_omnilong_main, args=(argv, env, str(cwd), str(out), str(err)))
        child.start()
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired([OMNILONG, *argv], timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess([OMNILONG, *argv], child.exitcode, out.read_text(), err.read_text())


def _omnilong_main(argv: list[str], env: dict, cwd: str, stdout: str, stderr: str) -> None:
    """In the forked process: what a new ``omnilong`` process has (environment, working
    directory, output files as its stdout and stderr), then its ``main``; exits with its status."""
    adopt(env, cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)
    from omnilong.cli import main

    sys.exit(main(argv))


def metrics(output_dir) -> list[dict]:
    """The per-step records of ``output_dir/metrics.jsonl``."""
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(reference_dir, other_dir, rel=1e-4):
    """Per-step token counts equal; losses and gradient norms (before clipping: clipping and
    AdamW hide a wrong gradient scale from the losses) within ``rel`` relative."""
    ref, other = metrics(reference_dir), metrics(other_dir)
    assert [m["step"] for m in ref] == [m["step"] for m in other]
    for a, b in zip(ref, other):
        assert a["num_tokens"] == b["num_tokens"]
        assert abs(a["loss"] - b["loss"]) <= rel * abs(a["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= rel * abs(a["grad_norm"]), (a, b)


def _setup_reached(self) -> None:
    raise AssertionError("the recipe went on to setup(): the config was not refused before any compute")


def refused_in_process(config, overrides, monkeypatch, capsys) -> str:
    """The one error line of ``tune run omnilong_full --config config ...`` that the recipe's
    constructor refuses: the recipe's ``main`` runs in this process (the same command-line
    parsing) and must exit with status 1 and one line on stderr before ``setup()`` (process
    group, data, model), which fails the test."""
    import omnilong_full

    monkeypatch.setattr(sys, "argv", ["omnilong_full", "--config", config, *_args(overrides)])
    monkeypatch.setattr(omnilong_full.OmniLongFullRecipe, "setup", _setup_reached)
    with pytest.raises(SystemExit) as stop:
        omnilong_full.recipe_main()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert stop.value.code == 1 and len(errors) == 1, err
    return errors[0]
