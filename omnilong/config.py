"""The recipe's config keys: which are required, their defaults, and early validation."""

import difflib
from typing import Any

from omegaconf import DictConfig, OmegaConf

REQUIRED_KEYS = ("checkpoint_dir", "output_dir", "max_seq_len", "max_steps", "dataset", "optimizer")

DEFAULTS: dict[str, Any] = {
    "tokenizer_dir": None,  # default: checkpoint_dir
    "device": "auto",  # auto | cpu | cuda
    "dtype": "bf16",  # compute dtype: bf16 | fp32 (sharded parameters and optimizer state stay fp32)
    "seed": 0,
    "batch_size": 1,  # rows per data-parallel rank per micro-step
    "gradient_accumulation_steps": 1,
    "shuffle": True,
    "num_workers": 0,
    "clip_grad_norm": 1.0,  # null: no clipping
    "freeze_vision": True,  # the vision tower keeps its weights (no gradients, no optimizer state)
    "rope_theta": None,  # override the checkpoint's RoPE base (long-context pretraining raises it)
    "dp_replicate_degree": 1,  # HSDP replicas (e.g. nodes); parameters are sharded within each
    "dp_shard_degree": -1,  # -1: the ranks left after dp_replicate and cp
    "cp_degree": 1,  # context parallel: each sequence split across this many ranks (ring attention)
    "fsdp_cpu_offload": False,
    "enable_activation_checkpointing": True,
    "loss": {"_component_": "omnilong.loss.ChunkedLinearCrossEntropy"},  # FullLogitsCrossEntropy to compare
    "lr_scheduler": None,
    "save_every_n_steps": None,  # write a resumable checkpoint every N steps (and at the last step)
    "keep_last_n_checkpoints": 2,
    "resume_from_checkpoint": False,  # true: the latest under output_dir/checkpoints; or a step_N path
    "save_hf_at_end": False,  # export the final weights to output_dir/hf as a Hugging Face model
    "metric_logger": None,
    "log_every_n_steps": 1,
}


def validate_config(cfg: DictConfig) -> DictConfig:
    """Check the keys of a recipe config and fill in defaults, before any work starts.

    Raises:
        ValueError: missing required keys, unknown keys (with the closest known key),
            or values of the wrong kind, naming each.
    """
    known = set(REQUIRED_KEYS) | set(DEFAULTS)
    problems = []
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            problems.append(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    for key in REQUIRED_KEYS:
        if key not in cfg or cfg[key] is None:
            problems.append(f"missing required key {key!r}")
    if problems:
        raise ValueError("config error: " + "; ".join(problems))
    merged = OmegaConf.merge(OmegaConf.create(DEFAULTS), cfg)
    for key in ("max_seq_len", "max_steps", "batch_size", "gradient_accumulation_steps"):
        if not isinstance(merged[key], int) or merged[key] <= 0:
            problems.append(f"{key} must be a positive integer, got {merged[key]!r}")
    if isinstance(merged.cp_degree, int) and merged.cp_degree > 1 and isinstance(merged.max_seq_len, int) \
            and merged.max_seq_len < 2 * merged.cp_degree:
        problems.append(f"max_seq_len={merged.max_seq_len} is too short for cp_degree={merged.cp_degree}: "
                        "the zigzag layout gives each cp rank 2 chunks; use max_seq_len >= 2 * cp_degree")
    if merged.save_every_n_steps is not None and (not isinstance(merged.save_every_n_steps, int)
                                                  or merged.save_every_n_steps <= 0):
        problems.append(f"save_every_n_steps must be a positive integer or null, got {merged.save_every_n_steps!r}")
    if not isinstance(merged.keep_last_n_checkpoints, int) or merged.keep_last_n_checkpoints < 1:
        problems.append(f"keep_last_n_checkpoints must be >= 1, got {merged.keep_last_n_checkpoints!r}")
    if merged.dtype not in ("bf16", "fp32"):
        problems.append(f"dtype must be bf16 or fp32, got {merged.dtype!r}")
    for key in ("dataset", "optimizer", "loss"):
        if not OmegaConf.is_dict(merged[key]) or "_component_" not in merged[key]:
            problems.append(f"{key} must be a mapping with a _component_")
    if problems:
        raise ValueError("config error: " + "; ".join(problems))
    return merged
