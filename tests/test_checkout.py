"""Tests run the code of the checkout they live in: in the pytest process, in spawned ranks and
in the processes `tune run` starts (which import through ``PYTHONPATH``, from any directory),
whatever checkout the installed ``omnilong`` (editable or not) points at."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHERE = "import importlib.util as u; print(u.find_spec('omnilong').origin); print(u.find_spec('omnilong_full').origin)"
EXPECTED = [str(REPO / "omnilong" / "__init__.py"), str(REPO / "recipes" / "omnilong_full.py")]


def _imported_files(rank, world_size):
    import importlib.util

    return [importlib.util.find_spec(name).origin for name in ("omnilong", "omnilong_full")]


def test_pytest_spawned_ranks_and_launched_processes_import_this_checkout(run_distributed, tmp_path):
    import omnilong

    assert omnilong.__file__ == EXPECTED[0] and _imported_files(0, 1) == EXPECTED
    assert run_distributed(_imported_files, 2) == [EXPECTED, EXPECTED]
    # What `tune run` and torchrun's ranks see: a fresh interpreter, started outside the checkout.
    launched = subprocess.run([sys.executable, "-c", WHERE], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert launched.stdout.split() == EXPECTED
