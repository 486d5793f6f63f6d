"""Who logs what: rank 0 everything from INFO up, other ranks only errors (checked in fresh processes)."""

import subprocess
import sys

import pytest

_EMIT = """
import logging, sys, warnings
from omnilong.logs import setup_logging
setup_logging(int(sys.argv[1]))
logging.getLogger("omnilong").info("an info line")
logging.getLogger("omnilong.data.packed_text").warning("a dataset warning")
logging.getLogger("transformers.tokenization_utils").warning("a library warning")
warnings.warn("a python warning")
logging.getLogger("omnilong").error("this rank's error")
"""


def _stderr(rank: int) -> str:
    return subprocess.run(
        [sys.executable, "-c", _EMIT, str(rank)], capture_output=True, text=True, check=True, timeout=60
    ).stderr


def test_rank_zero_logs_info_warnings_and_errors():
    err = _stderr(0)
    for message in ("an info line", "a dataset warning", "a library warning", "a python warning", "this rank's error"):
        assert message in err, err


@pytest.mark.parametrize("rank", [1, 3])
def test_other_ranks_log_only_their_errors(rank):
    err = _stderr(rank)
    assert "this rank's error" in err
    for message in ("an info line", "a dataset warning", "a library warning", "a python warning"):
        assert message not in err, err
