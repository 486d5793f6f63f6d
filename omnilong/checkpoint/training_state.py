"""Resumable training state: ``torch.distributed.checkpoint`` directories, written atomically.

Layout of ``<output_dir>/checkpoints/step_N/``:

- DCP files (``.metadata`` + ``__R_0.distcp``): ``model`` (native parameter names, sharded
  as trained; DCP reshards on load, so resuming on another world size works),
  ``optimizer``, ``lr_scheduler``, ``trainer`` (step, epoch, samples consumed in the epoch,
  bad samples skipped so far);
- ``rng/rank_R.pt``: each rank's RNG states;
- ``config.yaml``: the run's resolved config.

A checkpoint is written under ``step_N.tmp`` and renamed to ``step_N`` only once every
rank has finished writing, so a crash while saving leaves the previous checkpoints intact;
leftover ``.tmp`` directories are ignored and removed by the next save.
"""

import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from omnilong.checkpoint.dcp_io import SafeFileSystemReader, WeightsOnlyLoadPlanner

CHECKPOINTS_DIR = "checkpoints"
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


def find_latest_checkpoint(output_dir: Union[str, Path]) -> Optional[Path]:
    """The complete ``step_N`` directory with the largest N under ``output_dir/checkpoints``."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    complete = [p for p in root.iterdir() if p.is_dir() and is_complete_checkpoint(p)]
    return max(complete, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), default=None)


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
    output_dir: Union[str, Path],
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Optional[Any],
    trainer: dict[str, int],
    config: DictConfig,
    keep_last_n: int,
) -> Path:
    """Write ``output_dir/checkpoints/step_{step}`` on every rank (collective) and keep the
    last ``keep_last_n`` complete checkpoints.

    Returns:
        The final checkpoint directory.
    """
    rank = dist.get_rank()
    root = Path(output_dir) / CHECKPOINTS_DIR
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
        OmegaConf.save(config, tmp / "config.yaml")
    dist.barrier()
    dcp.save(_app_state(model, optimizer, lr_scheduler, trainer), checkpoint_id=tmp)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank}.pt")
    dist.barrier()
    maybe_inject_sigkill("during_save", step)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(root, keep_last_n)
    dist.barrier()
    return final


def _prune(root: Path, keep_last_n: int) -> None:
    for leftover in root.glob("step_*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    complete = sorted((p for p in root.iterdir() if is_complete_checkpoint(p)),
                      key=lambda p: int(_STEP_DIR.match(p.name).group(1)))
    for old in complete[: max(0, len(complete) - keep_last_n)]:
        shutil.rmtree(old, ignore_errors=True)


def load_training_state(
    path: Union[str, Path], model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Optional[Any]
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
        raise ValueError(f"cannot read checkpoint {path} (truncated or corrupt?): {type(cause).__name__} {cause}") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    rng_file = path / "rng" / f"rank_{dist.get_rank()}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return {k: int(v) for k, v in state["trainer"].items()}
