"""Resumable training state: ``torch.distributed.checkpoint`` directories, written atomically.

Layout of ``<output_dir>/checkpoints/step_N/``:

- DCP files (``.metadata`` + ``__R_0.distcp``): ``model`` (native parameter names, sharded
  as trained; DCP reshards on load, so resuming on another world size works),
  ``optimizer``, ``lr_scheduler``, ``trainer`` (step, epoch, samples consumed in the epoch,
  bad samples skipped so far);
- ``rng/rank_R.pt``: each rank's RNG states;
- ``config.yaml``: the run's resolved config;
- ``data.json``: what identifies the training data (``omnilong.checkpoint.run_dir.data_identity``);
- ``manifest.json``: the run's id (a resumed run keeps it) and the size of every file, so
  that a damaged file is found, and named, before anything is loaded. Pruning old
  checkpoints removes only those with the current run's id.

A checkpoint is written in the background (:class:`CheckpointWriter`) under ``step_N.tmp``
and renamed to ``step_N`` only once every rank has finished writing, so a crash while saving
leaves the previous checkpoints intact; leftover ``.tmp`` directories are ignored and removed
by the next save (a symlink in their place is refused, never followed). A full disk stops the
run naming the checkpoints folder, with the partial folder removed.

:class:`StopRequest` turns SIGTERM (SLURM, spot instances) and SIGINT (Ctrl-C) into a request
that the training loop honours after the current step, with a checkpoint.
"""

import errno
import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from omnilong.checkpoint.dcp_io import SafeFileSystemReader, WeightsOnlyLoadPlanner, read_checkpoint_metadata

CHECKPOINTS_DIR = "checkpoints"
RUN_CONFIG_NAME = "config.yaml"
DATA_IDENTITY_NAME = "data.json"
MANIFEST_NAME = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Fault injection for the crash tests: "after_step@N" SIGKILLs rank 0 when step N is done and
# the checkpoints started before it are written,
# "during_save@N" after step N's checkpoint files are written but before they are renamed
# into place. Unset in normal runs.
FAULT_ENV = "OMNILONG_INJECT_SIGKILL"
logger = logging.getLogger("omnilong")


def fault_injected(point: str, step: int) -> bool:
    """Whether ``$OMNILONG_INJECT_SIGKILL`` is ``f"{point}@{step}"`` (the same on every rank)."""
    return os.environ.get(FAULT_ENV) == f"{point}@{step}"


def maybe_inject_sigkill(point: str, step: int) -> None:
    """SIGKILL this process if :func:`fault_injected` (rank 0 only)."""
    if fault_injected(point, step) and dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def is_complete_checkpoint(path: Path) -> bool:
    return bool(_STEP_DIR.match(path.name)) and (path / ".metadata").is_file()


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def step_dirs(root: Path) -> list[Path]:
    """The complete ``step_N`` directories under ``root`` (a checkpoints folder), by step."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_complete_checkpoint(p)), key=_step_of)


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete ``step_N`` directory with the largest N under ``output_dir/checkpoints``."""
    return next(reversed(step_dirs(Path(output_dir) / CHECKPOINTS_DIR)), None)


def checkpoint_run_id(path: Path) -> str | None:
    """The id of the run that wrote checkpoint ``path`` (None: no readable manifest)."""
    try:
        return json.loads((path / MANIFEST_NAME).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _damage(path: Path) -> str | None:
    """What is wrong with the files of checkpoint ``path`` (None: nothing found)."""
    try:
        read_checkpoint_metadata(path)  # every DCP data file present and as long as .metadata says
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    try:
        files = json.loads((path / MANIFEST_NAME).read_text())["files"]
    except FileNotFoundError:
        return None  # written before manifests: DCP's own check above is all there is
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"cannot read {path / MANIFEST_NAME} ({e})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"checkpoint file {file} is missing (listed in {MANIFEST_NAME})"
        actual = file.stat().st_size
        if actual != size:
            damage = "truncated" if actual < size else "damaged"
            return f"checkpoint file {file} is {damage}: {actual} bytes, the save wrote {size}"
    return None


def verify_checkpoint(path: str | Path) -> None:
    """Check that every file of checkpoint ``path`` is there and whole, reading no tensor.

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint.
        ValueError: a damaged or missing file (names it, with both byte counts), and the
            newest earlier checkpoint next to it that is intact, if any.
    """
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {path / '.metadata'})")
    problem = _damage(path)
    if problem is None:
        return
    step = _step_of(path)
    earlier = [p for p in step_dirs(path.parent) if step is not None and _step_of(p) < step]
    intact = next((p for p in reversed(earlier) if _damage(p) is None), None)
    advice = (
        f"the newest intact earlier checkpoint is {intact}: resume with resume_from_checkpoint={intact}"
        if intact is not None
        else f"no earlier checkpoint in {path.parent} is intact"
    )
    raise ValueError(f"cannot resume from {path}: {problem}; {advice}")


def _app_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler, trainer: dict) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd, "trainer": trainer}
    if lr_scheduler is not None:
        state["lr_scheduler"] = lr_scheduler.state_dict()
    return state


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


class StopRequest:
    """Once installed (until uninstalled), SIGTERM and SIGINT only record that a stop was asked for
    (``self.signal``); the training loop agrees on it across ranks and stops after a step,
    with a checkpoint. Further signals are logged and ignored (SIGKILL stops at once)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log: bool):
        self.signal: signal.Signals | None = None
        self.log = log

    def install(self) -> "StopRequest":
        self._previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _record(self, signum: int, frame) -> None:
        if self.log:
            logger.warning(
                "received %s: %s",
                signal.Signals(signum).name,
                "already stopping" if self.signal else "stopping after this step, with a checkpoint",
            )
        self.signal = self.signal or signal.Signals(signum)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (the message names where and why); its partial
    ``step_N.tmp`` folder is removed and the earlier checkpoints are kept."""


def _no_space(error: BaseException | None) -> bool:
    """Whether ``error`` (or a rank's failure inside DCP's ``CheckpointException``, or a cause) is ENOSPC."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if isinstance(error, CheckpointException):
            return any(_no_space(f[0] if isinstance(f, tuple) else f) for f in error.failures.values())
        error = error.__cause__ or error.__context__
    return False


def _replace_dir(path: Path) -> None:
    """Remove ``path`` if it is a directory (a partial or old checkpoint of ours); a symlink or a
    file in its place is never followed nor removed.

    Raises:
        CheckpointWriteError: ``path`` is a symlink or not a directory (names it).
    """
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise CheckpointWriteError(
            f"{path} is a {'symlink' if path.is_symlink() else 'file'}, not a checkpoint folder: "
            "remove it (checkpoints are never written through it)"
        )
    shutil.rmtree(path, ignore_errors=True)


def _saved_config(config: DictConfig) -> DictConfig:
    """``config`` with its model and tokenizer folders made absolute: a step folder's config
    names the same folders from any working directory."""
    config = config.copy()
    for key in ("checkpoint_dir", "tokenizer_dir"):
        if config.get(key):
            config[key] = str(Path(config[key]).resolve())
    return config


class CheckpointWriter:
    """Writes ``output_dir/checkpoints/step_N`` in the background (DCP's ``async_save``: the
    state is copied to host memory, then written by a thread while training goes on).

    One write at a time: :meth:`save` first finishes the previous one. A write is finished
    (manifest written, ``step_N.tmp`` renamed to ``step_N``, old checkpoints of run ``run_id``
    pruned down to ``keep_last_n``) by :meth:`finish`, a collective that every rank calls at the
    same step, once every rank's write is done (:meth:`busy`, agreed on by the caller) or to
    wait for it. The writes' own collectives run on a separate gloo group, so they never
    interleave with the training's.
    """

    def __init__(self, output_dir: str | Path, keep_last_n: int, run_id: str):
        self.root = Path(output_dir) / CHECKPOINTS_DIR
        self.keep_last_n, self.run_id = keep_last_n, run_id
        self.group = dist.new_group(backend="gloo")
        self.rank = dist.get_rank()
        self.pending: tuple[int, Any, BaseException | None] | None = None  # step, future, this rank's error

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any | None,
        trainer: dict[str, int],
        config: DictConfig,
        data_identity: dict[str, Any] | None = None,
    ) -> None:
        """Start writing ``step_{step}`` (collective); returns once the state is copied.
        ``data_identity`` (JSON) goes to ``data.json``.

        Raises:
            CheckpointWriteError: the previous write failed, or this one could not start.
        """
        self.finish()
        tmp = self.root / f"step_{step}.tmp"
        error = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                _replace_dir(tmp)
                if (self.root / f"step_{step}").is_symlink():
                    _replace_dir(self.root / f"step_{step}")  # refused: never renamed over
                (tmp / "rng").mkdir(parents=True)
                OmegaConf.save(_saved_config(config), tmp / RUN_CONFIG_NAME)
                if data_identity is not None:
                    (tmp / DATA_IDENTITY_NAME).write_text(json.dumps(data_identity, indent=1) + "\n")
            except (OSError, CheckpointWriteError) as e:
                error = e
        self.pending = (step, None, error)
        self._agree_no_error()
        future, error = None, None
        try:
            future = dcp.async_save(
                _app_state(model, optimizer, lr_scheduler, trainer), checkpoint_id=tmp, process_group=self.group
            )
            torch.save(_rng_state(), tmp / "rng" / f"rank_{self.rank}.pt")
        except OSError as e:
            error = e
        self.pending = (step, getattr(future, "upload_completion", future), error)  # 2.14 may wrap the future

    def busy(self) -> bool:
        """Whether this rank's part of the pending write is still being written."""
        return self.pending is not None and self.pending[1] is not None and not self.pending[1].done()

    def finish(self) -> Path | None:
        """Wait for the pending write on every rank (collective) and put it in place.

        Returns:
            The checkpoint written (None: none was pending).

        Raises:
            CheckpointWriteError: on every rank, when any rank's write failed: "no space left on
                <checkpoints folder>" for a full disk, else the error; the partial folder is removed.
        """
        if self.pending is None:
            return None
        step, future, error = self.pending
        if future is not None and error is None:
            try:
                future.result()
            except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
                error = e
        self.pending = (step, None, error)
        self._agree_no_error()
        self.pending = None
        final, tmp = self.root / f"step_{step}", self.root / f"step_{step}.tmp"
        maybe_inject_sigkill("during_save", step)
        if self.rank == 0:
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / MANIFEST_NAME).write_text(json.dumps({"run_id": self.run_id, "files": files}, indent=1) + "\n")
            if final.exists() and checkpoint_run_id(final) != self.run_id:  # another run's: kept, renamed
                os.replace(final, final.with_name(f"{final.name}.of-run-{checkpoint_run_id(final) or 'unknown'}"))
            _replace_dir(final)
            os.replace(tmp, final)
            _prune(self.root, self.keep_last_n, self.run_id)
        dist.barrier(group=self.group)
        return final

    def _agree_no_error(self) -> None:
        """Raise the pending write's error on every rank if any rank has one, after rank 0
        removed the partial folder (collective)."""
        step, _, error = self.pending
        errors: list[str | None] = [None] * dist.get_world_size(self.group)
        mine = None
        if error is not None:
            mine = f"no space left on {self.root}" if _no_space(error) else f"{type(error).__name__}: {error}"
        dist.all_gather_object(errors, mine, group=self.group)
        failed = next((e for e in errors if e is not None), None)
        if failed is None:
            return
        self.pending = None
        tmp = self.root / f"step_{step}.tmp"
        if self.rank == 0 and tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        kept = find_latest_checkpoint(self.root.parent)
        raise CheckpointWriteError(
            f"cannot write the checkpoint of step {step} ({failed}); {tmp} removed, "
            + (f"the previous checkpoint {kept} is kept" if kept is not None else "no earlier checkpoint exists")
        )


def save_training_state(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any | None,
    trainer: dict[str, int],
    config: DictConfig,
    keep_last_n: int,
    run_id: str,
    data_identity: dict[str, Any] | None = None,
) -> Path:
    """Write ``output_dir/checkpoints/step_{step}`` on every rank (collective) and wait for it
    (:class:`CheckpointWriter`); keeps the last ``keep_last_n`` complete checkpoints of run
    ``run_id`` (others are never removed); ``data_identity`` (JSON) goes to ``data.json``.

    Returns:
        The final checkpoint directory.
    """
    writer = CheckpointWriter(output_dir, keep_last_n, run_id)
    writer.save(step, model, optimizer, lr_scheduler, trainer, config, data_identity)
    return writer.finish()


def _prune(root: Path, keep_last_n: int, run_id: str) -> None:
    for leftover in root.glob("step_*.tmp"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
    ours = [p for p in step_dirs(root) if checkpoint_run_id(p) == run_id]
    for old in ours[: max(0, len(ours) - keep_last_n)]:
        shutil.rmtree(old, ignore_errors=True)


def load_training_state(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any | None
) -> dict[str, int]:
    """Load a checkpoint written by :func:`save_training_state` into the (sharded) model,
    optimizer and lr scheduler, resharding to the current world size. Restores this
    rank's RNG states when the checkpoint has them.

    Returns:
        The ``trainer`` state (``step``, ``epoch``, ``consumed``, ``num_skipped``).

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint (names it).
        ValueError: a checkpoint file is truncated or unreadable (names the directory).
    """
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {path / '.metadata'})")
    state = _app_state(model, optimizer, lr_scheduler, {"step": 0, "epoch": 0, "consumed": 0, "num_skipped": 0})
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=WeightsOnlyLoadPlanner())
    except (Exception, CheckpointException) as e:  # CheckpointException (per-rank errors) is a BaseException
        cause = next(iter(e.failures.values())) if isinstance(e, CheckpointException) else e
        cause = cause[0] if isinstance(cause, tuple) else cause  # DCP pairs each failure with its stack frames
        raise ValueError(
            f"cannot read checkpoint {path} (truncated or corrupt?): {type(cause).__name__} {cause}"
        ) from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    rng_file = path / "rng" / f"rank_{dist.get_rank()}.pt"
    if rng_file.is_file():
        try:
            rng = torch.load(rng_file, weights_only=True)
        except Exception as e:  # a truncated zip archive, a foreign pickle
            raise ValueError(f"cannot read {rng_file} ({rng_file.stat().st_size} bytes; truncated?): {e}") from e
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return {k: int(v) for k, v in state["trainer"].items()}
