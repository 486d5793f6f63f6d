"""Which run an output directory belongs to, before anything is written to it.

A run refuses an ``output_dir`` that holds another run's metrics or checkpoints unless the
config says what to do: ``resume_from_checkpoint`` (continue that run; the saved config
must agree on model, data and optimizer unless ``allow_config_change_on_resume``) or
``overwrite_output_dir`` (the old run is renamed to ``<output_dir>.old-N``, never deleted).

A running run holds a lock on its ``output_dir`` (:class:`RunLock`: a POSIX lock, ``lockf``,
on ``<output_dir>/.run.lock``, which names the holder's host and pid); a second run on the
same ``output_dir`` is refused. The operating system releases the lock when the process
ends, however it ends (a ``kill -9`` too), so a lock is never left stale.
"""

import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from omnilong.checkpoint.training_state import (
    CHECKPOINTS_DIR,
    DATA_IDENTITY_NAME,
    RUN_CONFIG_NAME,
    find_latest_checkpoint,
    step_dirs,
)

logger = logging.getLogger("omnilong")

logger = logging.getLogger("omnilong")
METRICS_NAME = "metrics.jsonl"
LOCK_NAME = ".run.lock"
# Keys a resumed run must share with the checkpoint's run: its model, data and optimizer.
RESUME_KEYS = (
    "checkpoint_dir",
    "rope_theta",
    "freeze_vision",
    "dataset",
    "max_seq_len",
    "shuffle",
    "seed",
    "optimizer",
    "lr_scheduler",
)


def previous_run(output_dir: Path) -> list[str]:
    """What a previous run left in ``output_dir``: its metrics file and checkpoint folders."""
    found = [METRICS_NAME] if (output_dir / METRICS_NAME).is_file() else []
    return found + [f"{CHECKPOINTS_DIR}/{p.name}" for p in step_dirs(output_dir / CHECKPOINTS_DIR)]


def _holder(lock_file: Path) -> str:
    """Who holds the lock ``lock_file``, as its record says: ``host H, pid P``."""
    try:
        record = json.loads(lock_file.read_text())
        return f"host {record['host']}, pid {record['pid']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "host and pid unknown"


def _in_use(output_dir: Path) -> str:
    return (
        f"output_dir {output_dir} is in use by another run ({_holder(output_dir / LOCK_NAME)}): "
        "wait for it to end, stop it, or choose another output_dir"
    )


class RunLock:
    """An exclusive POSIX lock (``lockf``) on ``<output_dir>/.run.lock`` held by this process
    until :meth:`release` or its end (the system releases it then, even after a ``kill -9``).
    A POSIX lock, not ``flock``: forked children (DataLoader workers) do not inherit it, so it
    does not outlive a killed run in its workers; it works across hosts on NFS. The file
    records this process's host and pid for the message a second run gets; it is never
    deleted (deleting a lock file lets two processes lock two different files).

    On a filesystem without locks (some Lustre mounts) nothing is locked and a warning says so.
    """

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._fd)
            self._fd = None
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise ValueError(_in_use(Path(output_dir))) from e
            logger.warning(
                "cannot lock %s (%s): another run writing to the same output_dir would not be noticed",
                self.path,
                e.strerror,
            )
            return
        os.ftruncate(self._fd, 0)
        os.write(self._fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode() + b"\n")

    def release(self) -> None:
        """Unlock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)  # releases this process's POSIX locks on the file
            self._fd = None


def check_not_in_use(output_dir: Path) -> None:
    """Refuse an ``output_dir`` whose lock another run holds, without taking the lock (a shared
    probe, released at once: every rank may call it at the same time). The run's own lock is
    taken later by :func:`prepare_output_dir` (call this before it: closing the probe's file
    would release a lock this process holds on it).

    Raises:
        ValueError: naming the holder's host and pid.
    """
    try:
        fd = os.open(output_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return  # no lock file (or no output_dir): no run has held it
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise ValueError(_in_use(output_dir)) from e
    finally:
        os.close(fd)


def resume_path(cfg: DictConfig) -> Path | None:
    """The checkpoint ``resume_from_checkpoint`` asks for (None: start at step 1).

    Raises:
        ValueError: another run is writing to ``output_dir`` (:func:`check_not_in_use`), or
            ``output_dir`` holds another run and the config says neither to resume it nor to
            move it aside.
    """
    output_dir, wanted = Path(cfg.output_dir), cfg.resume_from_checkpoint
    check_not_in_use(output_dir)
    if wanted is None or wanted is False:
        found = previous_run(output_dir)
        if found and not cfg.overwrite_output_dir:
            shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
            raise ValueError(
                f"output_dir {output_dir} holds another run ({shown}): continue it with resume_from_checkpoint=true, "
                "move it aside with overwrite_output_dir=true, or choose another output_dir"
            )
        return None
    return find_latest_checkpoint(output_dir) if wanted is True else Path(wanted)


def _flatten(node: Any, prefix: str) -> dict[str, Any]:
    """``{"a.b[0].c": value}`` of nested dicts and lists under ``prefix``."""
    if isinstance(node, list):
        out = {}
        for i, value in enumerate(node):
            out.update(_flatten(value, f"{prefix}[{i}]"))
        return out or {prefix: []}
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
        return out or {prefix: {}}
    return {prefix: node}


def _resolved(config: dict, key: str) -> Any:
    """``config[key]``, a folder's path resolved (step folders store it absolute, users often relative)."""
    value = config.get(key)
    return str(Path(value).resolve()) if key == "checkpoint_dir" and isinstance(value, str) else value


def check_resume_config(checkpoint: Path, cfg: DictConfig) -> None:
    """Refuse to resume ``checkpoint`` with another model, data or optimizer than it was
    trained with (:data:`RESUME_KEYS`), or with another ``max_steps`` when an lr schedule
    (which spans ``max_steps``) is set, unless ``cfg.allow_config_change_on_resume``; then
    a changed ``max_steps`` is still logged as a warning.

    Raises:
        ValueError: naming the checkpoint's config.yaml and every key that differs.
    """
    saved_path = checkpoint / RUN_CONFIG_NAME
    if not saved_path.is_file():
        return
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    new = OmegaConf.to_container(cfg, resolve=True)
    keys = RESUME_KEYS + (("max_steps",) if new.get("lr_scheduler") is not None else ())
    old_values, new_values = {}, {}
    for key in keys:
        old_values.update(_flatten(_resolved(saved, key), key))
        new_values.update(_flatten(_resolved(new, key), key))
    if cfg.allow_config_change_on_resume:
        if old_values.get("max_steps", new.get("max_steps")) != new.get("max_steps"):
            logger.warning(
                "resume_from_checkpoint: max_steps changed from %s (%s) to %s: the lr schedule spans the new "
                "max_steps, so the learning rate changes at the resumed step",
                old_values["max_steps"],
                saved_path,
                new["max_steps"],
            )
        return
    changed = _differences(old_values, new_values)
    if changed:
        raise ValueError(
            f"resume_from_checkpoint: this run's config differs from {saved_path} in {', '.join(changed)}: "
            "resume with the saved values, set allow_config_change_on_resume=true to resume anyway, "
            "or start a new run in another output_dir"
        )


def _differences(old_values: dict[str, Any], new_values: dict[str, Any]) -> list[str]:
    """``"key (old -> new)"`` of every flattened key whose value differs, sorted by key."""
    return [
        f"{k} ({old_values.get(k, '<unset>')!r} -> {new_values.get(k, '<unset>')!r})"
        for k in sorted(set(old_values) | set(new_values))
        if old_values.get(k) != new_values.get(k)
    ]


def data_identity(dataset: Any) -> dict[str, Any]:
    """What identifies a run's training data, as cheaply known: the dataset's type and rows per
    epoch (packing and ``max_seq_len`` change them) and the samples it skipped while reading;
    for prepared data, ``dataset.prepared_sources`` (each source's path, weight, document and
    token counts and a fingerprint of its ``meta.json`` contents). The dataset's config node
    is in the checkpoint's ``config.yaml`` (:func:`check_resume_config`)."""
    identity = {
        "dataset": type(dataset).__name__,
        "rows": len(dataset),
        "skipped_while_reading": int(getattr(dataset, "num_skipped", 0)),
    }
    prepared = getattr(dataset, "prepared_sources", None)
    if prepared:
        identity["sources"] = prepared
    return identity


def check_resume_data(checkpoint: Path, identity: dict[str, Any], allow_change: bool) -> None:
    """Refuse to resume ``checkpoint`` on other data than it was trained on (its ``data.json``
    against this run's :func:`data_identity`), unless ``allow_change``
    (``allow_config_change_on_resume``). A checkpoint without ``data.json`` is not checked.

    Raises:
        ValueError: naming the checkpoint's data.json and every value that differs.
    """
    saved_path = checkpoint / DATA_IDENTITY_NAME
    if allow_change or not saved_path.is_file():
        return
    try:
        saved = json.loads(saved_path.read_text())
    except ValueError as e:
        raise ValueError(f"resume_from_checkpoint: cannot read {saved_path} ({e})") from e
    old_values, new_values = _flatten(saved, ""), _flatten(identity, "")
    changed = _differences(old_values, new_values)
    if changed:
        raise ValueError(
            f"resume_from_checkpoint: this run's data differs from what {saved_path} records: {', '.join(changed)}: "
            "resume on the same data, set allow_config_change_on_resume=true to resume anyway, "
            "or start a new run in another output_dir"
        )


def _writable(path: Path) -> str | None:
    """None when ``path`` is (made) a directory this process can write in, else why not."""
    if path.exists() and not path.is_dir():
        return f"{path} is not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return f"{e.strerror or type(e).__name__}: {e.filename or path}"
    return None


def _writable_dir(output_dir: Path) -> None:
    problem = _writable(output_dir)
    if problem is not None:
        raise ValueError(f"output_dir {output_dir} is not writable ({problem}): choose another output_dir")


def prepare_output_dir(cfg: DictConfig, saves_checkpoints: bool) -> tuple[Path | None, RunLock]:
    """Lock ``output_dir`` for this run (:class:`RunLock`), move a previous run aside when
    ``overwrite_output_dir`` says so (never one that is running: the lock is taken first), then
    make sure ``output_dir`` (and its ``checkpoints`` folder when the run saves any) can be
    written. Call on one rank only.

    Returns:
        Where the previous run was moved (None: there was none), and the lock to release when
        the run ends.

    Raises:
        ValueError: another run holds ``output_dir`` (names its host and pid); a directory that
            cannot be created or written (names it and why).
    """
    output_dir = Path(cfg.output_dir)
    _writable_dir(output_dir)
    lock = RunLock(output_dir)
    moved = None
    if cfg.overwrite_output_dir and previous_run(output_dir):
        n = 1
        while (moved := output_dir.with_name(f"{output_dir.name}.old-{n}")).exists():
            n += 1
        try:
            os.rename(output_dir, moved)  # the lock file goes along, still locked until the new one is
        except OSError as e:
            lock.release()
            raise ValueError(f"overwrite_output_dir: cannot move {output_dir} to {moved} ({e.strerror})") from e
        try:
            _writable_dir(output_dir)
            new_lock = RunLock(output_dir)
        finally:
            lock.release()
        lock = new_lock
    if saves_checkpoints:
        problem = _writable(output_dir / CHECKPOINTS_DIR)
        if problem is not None:
            lock.release()
            raise ValueError(
                f"output_dir: checkpoints cannot be written to {output_dir / CHECKPOINTS_DIR} "
                f"({problem}): fix it or choose another output_dir"
            )
    return moved, lock
