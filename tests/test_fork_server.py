"""The session's fork server (tests/fork_server.py)."""

import importlib

import pytest

from tests.fork_server import PRELOAD


@pytest.mark.parametrize("module", PRELOAD)
def test_every_preloaded_module_imports(module):
    """multiprocessing ignores a preload that fails to import; a misspelt one would silently
    leave every forked process to import it itself."""
    importlib.import_module(module)
