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

A checkpoint is written under ``step_N.tmp`` and renamed to ``step_N`` only once every
rank has finished writing, so a crash while saving leaves the previous checkpoints intact;
leftover ``.tmp`` directories are ignored and removed by the next save.
"""

import json
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
# Fault injection for the crash tests: "after_step@N" SIGKILLs rank 0 when step N is done,
# "during_save@N" after step N's checkpoint files are written but before they are renamed
# into place. Unset in normal runs.
FAULT_ENV = "OMNILONG_INJECT_SIGKILL"


def maybe_inject_sigkill(point: str, step: int) -> None:
    """SIGKILL this process if ``$OMNILONG_INJECT_SIGKILL`` is ``f"{point}@{step}"`` (rank 0 only)."""
    if os.environ.get(FAULT_ENV) == f"{point}@{step}" and dist.get_rank() == 0:
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
    """Write ``output_dir/checkpoints/step_{step}`` on every rank (collective) and keep the
    last ``keep_last_n`` complete checkpoints of run ``run_id`` (others are never removed);
    ``data_identity`` (JSON) goes to ``data.json``.

    Returns:
        The final checkpoint directory.
    """
    rank = dist.get_rank()
    root = Path(output_dir) / CHECKPOINTS_DIR
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
        OmegaConf.save(config, tmp / RUN_CONFIG_NAME)
        if data_identity is not None:
            (tmp / DATA_IDENTITY_NAME).write_text(json.dumps(data_identity, indent=1) + "\n")
    dist.barrier()
    dcp.save(_app_state(model, optimizer, lr_scheduler, trainer), checkpoint_id=tmp)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank}.pt")
    dist.barrier()
    maybe_inject_sigkill("during_save", step)
    if rank == 0:
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST_NAME).write_text(json.dumps({"run_id": run_id, "files": files}, indent=1) + "\n")
        if final.exists() and checkpoint_run_id(final) != run_id:  # another run's: kept, renamed
            os.replace(final, final.with_name(f"{final.name}.of-run-{checkpoint_run_id(final) or 'unknown'}"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(root, keep_last_n, run_id)
    dist.barrier()
    return final


def _prune(root: Path, keep_last_n: int, run_id: str) -> None:
    for leftover in root.glob("step_*.tmp"):
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
