"""The host-sync recorder: the CPU stand-in sees reads and data-dependent operators, names the
line that made them and leaves nothing behind; on CUDA it records torch's sync debug warnings
(checked here with the mode switched by a stand-in and the warning raised by hand)."""

import threading
import warnings

import pytest
import torch

from omnilong.testing import host_syncs as module
from omnilong.testing.host_syncs import HostSync, HostSyncError, cuda_sync_error, describe, host_syncs, no_host_sync

HERE = "tests/testing/test_host_syncs.py"


def _line_of(marker: str) -> int:
    """The line of this file that ends with ``# marker``."""
    lines = open(__file__).read().splitlines()
    return next(number for number, line in enumerate(lines, 1) if line.endswith(f"# {marker}"))


def test_reads_and_data_dependent_ops_are_syncs_and_arithmetic_is_not():
    x = torch.arange(6.0)
    with host_syncs() as syncs:
        (x * 2 + 1).sum()
        x.repeat_interleave(2, dim=0)
        x.sum().item()  # item
        bool(x[1])  # bool
        x.nonzero()  # nonzero
        x[x > 2]  # boolean index
        x.tolist()  # tolist
    assert [sync.what for sync in syncs] == [
        "aten._local_scalar_dense",
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten.index",
        "Tensor.tolist()",
    ]
    lines = [_line_of(marker) for marker in ("item", "bool", "nonzero", "boolean index", "tolist")]
    assert [sync.where for sync in syncs] == [
        f"{HERE}:{line} (test_reads_and_data_dependent_ops_are_syncs_and_arithmetic_is_not)" for line in lines
    ]


def test_the_guard_leaves_tensor_methods_as_they_were():
    with host_syncs():
        pass
    assert "tolist" not in torch.Tensor.__dict__ and torch.arange(3).tolist() == [0, 1, 2]


def test_no_host_sync_raises_at_the_first_sync():
    with pytest.raises(HostSyncError, match="host sync: aten.nonzero at tests/testing/test_host_syncs.py"):
        with no_host_sync():
            torch.arange(3).nonzero()


def test_each_thread_reports_to_its_own_guard():
    """Virtual ranks run in threads, each inside its own guard (a dispatch mode is per thread)."""
    found, ready = {}, threading.Barrier(2)

    def rank(n: int) -> None:
        with host_syncs() as syncs:
            ready.wait()
            for _ in range(n):
                torch.ones(1).item()
                torch.ones(2).tolist()
        found[n] = len(syncs)

    threads = [threading.Thread(target=rank, args=(n,)) for n in (1, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found == {1: 2, 3: 6}
    assert "tolist" not in torch.Tensor.__dict__


def test_describe_counts_the_sites():
    syncs = [HostSync("aten.nonzero", "a.py:3 (f)")] * 2 + [HostSync("cuda", "b.py:9 (g)")]
    assert describe(syncs) == "3 host syncs: a.py:3 (f) x2 [aten.nonzero]; b.py:9 (g) [cuda]"
    assert describe([]) == "no host sync"


def test_on_cuda_every_sync_warning_is_recorded_and_the_mode_restored(monkeypatch):
    """torch's sync debug mode is switched to "warn" inside and back after; each of its
    warnings is a sync at the line that raised it, other warnings are shown as usual."""
    modes = _fake_sync_debug_mode(monkeypatch)
    message = "called a synchronizing CUDA operation (Triggered internally at CUDAFunctions.cpp:186.)"
    with pytest.warns(UserWarning, match="unrelated"), host_syncs("cuda") as syncs:
        assert modes[-1] == "warn"
        for _ in range(2):
            warnings.warn(message, stacklevel=1)  # cuda warning: raised as torch raises it
        warnings.warn("unrelated", stacklevel=1)
    assert modes[-1] == 0
    where = f"{HERE}:{_line_of('cuda warning: raised as torch raises it')} (test_on_cuda_every_sync_warning_is_recorded_and_the_mode_restored)"
    assert syncs == [HostSync("cuda", where)] * 2


def _fake_sync_debug_mode(monkeypatch) -> list:
    """torch.cuda's sync debug mode switched by a stand-in: the list of modes set, last current."""
    modes = [0]
    monkeypatch.setattr(module.torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    monkeypatch.setattr(module.torch.cuda, "set_sync_debug_mode", modes.append)
    return modes


def test_error_mode_names_the_first_sync_and_restores_the_mode(monkeypatch):
    """torch raises its sync error (here by hand, from a virtual rank's thread-like wrapper)."""
    modes = _fake_sync_debug_mode(monkeypatch)

    def step():
        assert modes[-1] == "error"
        raise RuntimeError("called a synchronizing CUDA operation")  # the sync

    def wrapped():
        try:
            step()
        except RuntimeError as error:
            raise RuntimeError(f"virtual rank 0 of 2 failed: {error}") from error

    where = f"{HERE}:{_line_of('the sync')} (step)"
    assert cuda_sync_error(wrapped) == HostSync("cuda", where) and modes[-1] == 0
    assert cuda_sync_error(lambda: None) is None and modes[-1] == 0
    with pytest.raises(RuntimeError, match="unrelated"):
        cuda_sync_error(lambda: (_ for _ in ()).throw(RuntimeError("unrelated")))
    assert modes[-1] == 0
