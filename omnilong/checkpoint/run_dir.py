"""Which run an output directory belongs to, before anything is written to it.

A run refuses an ``output_dir`` that holds another run's metrics or checkpoints unless the
config says what to do: ``resume_from_checkpoint`` (continue that run; the saved config
must agree on model, data and optimizer unless ``allow_config_change_on_resume``) or
``overwrite_output_dir`` (the old run is renamed to ``<output_dir>.old-N``, never deleted).
"""

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from omnilong.checkpoint.training_state import CHECKPOINTS_DIR, RUN_CONFIG_NAME, find_latest_checkpoint, step_dirs

logger = logging.getLogger("omnilong")
METRICS_NAME = "metrics.jsonl"
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


def resume_path(cfg: DictConfig) -> Path | None:
    """The checkpoint ``resume_from_checkpoint`` asks for (None: start at step 1).

    Raises:
        ValueError: ``output_dir`` holds another run and the config says neither to resume
            it nor to move it aside.
    """
    output_dir, wanted = Path(cfg.output_dir), cfg.resume_from_checkpoint
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
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}"))
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
    changed = [
        f"{k} ({old_values.get(k, '<unset>')!r} -> {new_values.get(k, '<unset>')!r})"
        for k in sorted(set(old_values) | set(new_values))
        if old_values.get(k) != new_values.get(k)
    ]
    if changed:
        raise ValueError(
            f"resume_from_checkpoint: this run's config differs from {saved_path} in {', '.join(changed)}: "
            "resume with the saved values, set allow_config_change_on_resume=true to resume anyway, "
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


def prepare_output_dir(cfg: DictConfig, saves_checkpoints: bool) -> Path | None:
    """Move a previous run aside when ``overwrite_output_dir`` says so, then make sure
    ``output_dir`` (and its ``checkpoints`` folder when the run saves any) can be written.
    Call on one rank only.

    Returns:
        Where the previous run was moved (None: there was none).

    Raises:
        ValueError: a directory that cannot be created or written (names it and why).
    """
    output_dir = Path(cfg.output_dir)
    moved = None
    if cfg.overwrite_output_dir and previous_run(output_dir):
        n = 1
        while (moved := output_dir.with_name(f"{output_dir.name}.old-{n}")).exists():
            n += 1
        try:
            os.rename(output_dir, moved)
        except OSError as e:
            raise ValueError(f"overwrite_output_dir: cannot move {output_dir} to {moved} ({e.strerror})") from e
    problem = _writable(output_dir)
    if problem is not None:
        raise ValueError(f"output_dir {output_dir} is not writable ({problem}): choose another output_dir")
    if saves_checkpoints:
        problem = _writable(output_dir / CHECKPOINTS_DIR)
        if problem is not None:
            raise ValueError(
                f"output_dir: checkpoints cannot be written to {output_dir / CHECKPOINTS_DIR} "
                f"({problem}): fix it or choose another output_dir"
            )
    return moved
