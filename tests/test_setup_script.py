"""``scripts/setup.sh`` as a user runs it, with a stand-in ``.venv/bin/python`` that records its
arguments instead of installing: the extras it installs by default."""

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _setup_pip_arguments(tmp_path: Path, extras: str | None) -> str:
    """The arguments setup.sh gives ``.venv/bin/python``, run in a copy of the script with no
    FFmpeg check tools on ``PATH`` (so it only warns) and an existing ``.venv``."""
    (tmp_path / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "pip_args"}\n')
    python.chmod(0o755)
    tools = tmp_path / "tools_on_path"
    tools.mkdir()
    for name in ("dirname", "grep", "id"):
        (tools / name).symlink_to(shutil.which(name))
    env = {"PATH": str(tools), **({"OMNILONG_EXTRAS": extras} if extras else {})}
    subprocess.run([shutil.which("bash"), "scripts/setup.sh"], cwd=tmp_path, env=env, check=True, capture_output=True)
    return (tmp_path / "pip_args").read_text()


def test_setup_installs_the_eval_extra_by_default(tmp_path):
    """Heatmaps of tools/evaluate.py need matplotlib (the ``eval`` extra): installed without asking."""
    assert "-e .[test,eval]" in _setup_pip_arguments(tmp_path / "default", None)
    assert "-e .[test,eval,wandb]" in _setup_pip_arguments(tmp_path / "wandb", "wandb")
