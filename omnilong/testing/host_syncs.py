"""Host syncs made by a block of code: recorded on CUDA by torch's sync debug mode, and on CPU
by a stand-in that watches the same kinds of operation.

A host sync is the host waiting for the device: a value read back (``.item()``, ``bool(t)``,
``.tolist()``), an operator whose output size depends on values (``nonzero``, boolean
indexing, ``unique``), a blocking copy. On a GPU each one stalls the stream, so a decoder
layer, a ring step, a decode step or the loss must make none (attention is planned once per
batch, see ``DESIGN.md``).

* CUDA: :func:`host_syncs` turns on ``torch.cuda.set_sync_debug_mode("warn")`` and records each
  warning with the innermost caller outside torch. ``"error"`` would stop at the first sync;
  recording lists every site of a run in one go.
* CPU, where nothing waits: a stand-in records the operators that read values back when their
  input is on a GPU (:data:`SYNCING_OPS`, boolean indexing) and ``Tensor.tolist()`` /
  ``.numpy()``. It cannot see copies between host and device (there are none on CPU).
  Operators are watched in the thread that entered the guard (a dispatch mode belongs to one
  thread); ``tolist`` and ``numpy`` in every thread while any guard is active.

:func:`no_host_sync` is the CPU stand-in in its raising form: :class:`HostSyncError` at the
first sync (what the tests use in place of ``set_sync_debug_mode("error")``).
"""

import contextlib
import os
import sys
import sysconfig
import threading
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPS = frozenset(
    {
        "_local_scalar_dense",  # .item(), int(t), float(t)
        "is_nonzero",  # bool(t), `if t:`
        "nonzero",
        "masked_select",
        "unique_consecutive",
        "_unique",
        "_unique2",
        "unique_dim",
        "equal",
        "bincount",
    }
)
"""ATen operators (by name) that read a CUDA tensor's values back to the host."""

_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})  # sync with a boolean index
_HOST_READS = ("tolist", "numpy")
_CUDA_SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's message in sync debug mode

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_STDLIB_DIR = sysconfig.get_paths()["stdlib"] + os.sep
_REPO_DIR = str(Path(__file__).resolve().parents[2]) + os.sep


class HostSyncError(AssertionError):
    """A host sync inside :func:`no_host_sync`."""


@dataclass(frozen=True)
class HostSync:
    """One host sync: ``what`` made it (an operator or method on CPU, torch's warning on CUDA)
    and ``where``: ``path:line (function)`` of the innermost caller outside torch."""

    what: str
    where: str


def describe(syncs: Sequence[HostSync]) -> str:
    """``"no host sync"``, or e.g. ``"3 host syncs: a.py:10 (f) x2 [aten.nonzero]; b.py:5 (g) [cuda]"``."""
    if not syncs:
        return "no host sync"
    sites = Counter((sync.where, sync.what) for sync in syncs)
    parts = [f"{where}{f' x{n}' if n > 1 else ''} [{what}]" for (where, what), n in sites.items()]
    return f"{len(syncs)} host sync{'s' if len(syncs) > 1 else ''}: " + "; ".join(parts)


def _site(frames: Iterable[tuple[str, int, str]]) -> str:
    """``path:line (function)`` of the first of ``frames`` (``(path, line, function)``, innermost
    first) outside this module, torch and the standard library, else of the first; paths
    relative to the checkout when inside it."""
    frames = list(frames)
    path, line, function = next((frame for frame in frames if _outside_libraries(frame[0])), frames[0])
    return f"{path.removeprefix(_REPO_DIR)}:{line} ({function})"


def _outside_libraries(path: str) -> bool:
    """Whether ``path`` is code of its own: not this module, torch or the standard library."""
    library = path.startswith(_STDLIB_DIR) and "-packages" not in path
    return path != __file__ and not path.startswith((_TORCH_DIR, "<frozen")) and not library


def _caller() -> str:
    """The :func:`_site` of this thread's stack (the caller of the caller, outward)."""
    frame, frames = sys._getframe(1), []
    while frame is not None:
        frames.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    return _site(frames)


class _SyncingOps(TorchDispatchMode):
    """Calls ``report(name)`` for each operator of :data:`SYNCING_OPS` or with a boolean index."""

    def __init__(self, report: Callable[[str], None]):
        super().__init__()
        self.report = report

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name in _INDEX_OPS and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ())
        )
        if name in SYNCING_OPS or boolean_index:
            self.report(f"aten.{name}")
        return func(*args, **(kwargs or {}))


class _CpuGuard:
    """The CPU stand-in: ``on_sync(HostSync)`` for every sync of the entering thread's
    operators and of ``tolist``/``numpy`` (those of threads without a guard go to the latest)."""

    _lock = threading.Lock()
    _active: list["_CpuGuard"] = []  # entered guards, oldest first
    _saved: dict[str, Any] = {}  # torch.Tensor's own attributes that the host-read watchers shadow

    def __init__(self, on_sync: Callable[[HostSync], None]):
        self.on_sync = on_sync
        self.thread = threading.get_ident()
        self.mode = _SyncingOps(self.report)

    def report(self, what: str) -> None:
        self.on_sync(HostSync(what, _caller()))

    def __enter__(self) -> "_CpuGuard":
        with _CpuGuard._lock:
            if not _CpuGuard._active:
                for name in _HOST_READS:
                    _CpuGuard._saved[name] = torch.Tensor.__dict__.get(name)
                    setattr(torch.Tensor, name, _watched(name, getattr(torch.Tensor, name)))
            _CpuGuard._active.append(self)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)
        with _CpuGuard._lock:
            _CpuGuard._active.remove(self)
            if not _CpuGuard._active:
                for name in _HOST_READS:
                    if _CpuGuard._saved[name] is None:
                        delattr(torch.Tensor, name)
                    else:
                        setattr(torch.Tensor, name, _CpuGuard._saved[name])

    @staticmethod
    def of_this_thread() -> "_CpuGuard | None":
        """The innermost guard entered by this thread, else the latest of any thread."""
        with _CpuGuard._lock:
            mine = [g for g in _CpuGuard._active if g.thread == threading.get_ident()]
            return mine[-1] if mine else (_CpuGuard._active[-1] if _CpuGuard._active else None)


def _watched(name: str, method: Callable) -> Callable:
    """``Tensor.<name>`` that reports itself to the thread's guard first."""

    def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        guard = _CpuGuard.of_this_thread()
        if guard is not None:
            guard.report(f"Tensor.{name}()")
        return method(self, *args, **kwargs)

    return read


@contextlib.contextmanager
def _cuda_sync_warnings(on_sync: Callable[[HostSync], None]) -> Iterator[None]:
    """Inside: torch's sync debug mode warns, and each such warning goes to ``on_sync``."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=_CUDA_SYNC_WARNING)
        show = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if str(message).startswith(_CUDA_SYNC_WARNING):
                on_sync(HostSync("cuda", _caller()))
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)


@contextlib.contextmanager
def host_syncs(device: torch.device | str = "cpu") -> Iterator[list[HostSync]]:
    """Yields the list of the host syncs made inside, filled as they happen.

    On CUDA, torch's sync debug mode (process-wide: every thread's syncs are recorded); on CPU
    the stand-in (operators of the entering thread only). See the module docstring.
    """
    records: list[HostSync] = []
    guard = _cuda_sync_warnings if torch.device(device).type == "cuda" else _CpuGuard
    with guard(records.append):
        yield records


def cuda_sync_error(fn: Callable[[], Any]) -> HostSync | None:
    """Runs ``fn()`` in torch's ``"error"`` sync debug mode: the first host sync it made, or
    ``None``. Slower to use than :func:`host_syncs` (it stops at the first), but no warning
    filter inside ``fn`` can hide a sync from it.

    Raises:
        Any exception of ``fn`` other than torch's sync error.
    """
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as error:
        chain = [error]  # a thread's error may come wrapped (local_ring: "virtual rank r failed")
        while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
            chain.append(chain[-1].__cause__ or chain[-1].__context__)
        raised = [e for e in chain if str(e).startswith(_CUDA_SYNC_WARNING)]
        if not raised:
            raise
        frames = reversed(traceback.extract_tb(raised[-1].__traceback__))
        return HostSync("cuda", _site((f.filename, f.lineno, f.name) for f in frames))
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return None


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Inside: any host sync the CPU stand-in sees raises :class:`HostSyncError`."""

    def refuse(sync: HostSync) -> None:
        raise HostSyncError(f"host sync: {sync.what} at {sync.where}")

    with _CpuGuard(refuse):
        yield
