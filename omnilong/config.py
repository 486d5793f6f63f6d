"""The recipe's config keys: which are required, their defaults, and early validation."""

import difflib
import inspect
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torchtune.config._utils import _get_component_from_path

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
    "activation_offload": False,  # CUDA: saved activations (the checkpointed layer inputs) to pinned host memory
    "mlp_chunk_size": None,  # tokens per chunk of each decoder layer's norm + MLP (null: whole sequence)
    "loss": {"_component_": "omnilong.loss.ChunkedLinearCrossEntropy"},  # FullLogitsCrossEntropy to compare
    "lr_scheduler": None,
    "save_every_n_steps": None,  # write a resumable checkpoint every N steps (and at the last step)
    "keep_last_n_checkpoints": 2,
    "resume_from_checkpoint": False,  # true: the latest under output_dir/checkpoints; or a step_N path
    "overwrite_output_dir": False,  # true: move a previous run's output_dir aside (never deleted) and start anew
    "allow_config_change_on_resume": False,  # true: resume although model, data or optimizer keys changed
    "save_hf_at_end": False,  # export the final weights to output_dir/hf as a Hugging Face model
    "metric_logger": None,
    "log_every_n_steps": 1,
}

_POSITIVE_INTS = ("max_seq_len", "max_steps", "batch_size", "gradient_accumulation_steps", "log_every_n_steps",
                  "dp_replicate_degree", "cp_degree", "keep_last_n_checkpoints")
_BOOLS = ("shuffle", "freeze_vision", "fsdp_cpu_offload", "enable_activation_checkpointing", "save_hf_at_end",
          "overwrite_output_dir", "allow_config_change_on_resume", "activation_offload")
# Component keys -> what the recipe passes itself: (number of positional arguments, keyword arguments).
_COMPONENTS: dict[str, tuple[int, tuple[str, ...]]] = {
    "dataset": (1, ("max_seq_len",)),  # the tokenizer
    "optimizer": (1, ()),  # the trainable parameters
    "lr_scheduler": (1, ("num_training_steps",)),  # the optimizer
    "loss": (0, ()),
    "metric_logger": (0, ()),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # `max_steps=true` is not a step count


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value_problems(cfg: DictConfig) -> list[str]:
    """Keys whose value has the wrong kind or range."""
    problems = []
    for key in _POSITIVE_INTS:
        if not _is_int(cfg[key]) or cfg[key] <= 0:
            problems.append(f"{key} must be a positive integer, got {cfg[key]!r}")
    for key in ("seed", "num_workers"):
        if not _is_int(cfg[key]) or cfg[key] < 0:
            problems.append(f"{key} must be an integer >= 0, got {cfg[key]!r}")
    if not _is_int(cfg.dp_shard_degree) or not (cfg.dp_shard_degree == -1 or cfg.dp_shard_degree > 0):
        problems.append(f"dp_shard_degree must be -1 or a positive integer, got {cfg.dp_shard_degree!r}")
    if cfg.mlp_chunk_size is not None and (not _is_int(cfg.mlp_chunk_size) or cfg.mlp_chunk_size <= 0):
        problems.append(f"mlp_chunk_size must be a positive number of tokens or null, got {cfg.mlp_chunk_size!r}")
    if cfg.save_every_n_steps is not None and (not _is_int(cfg.save_every_n_steps) or cfg.save_every_n_steps <= 0):
        problems.append(f"save_every_n_steps must be a positive integer or null, got {cfg.save_every_n_steps!r}")
    for key in _BOOLS:
        if not isinstance(cfg[key], bool):
            problems.append(f"{key} must be true or false, got {cfg[key]!r}")
    for key in ("clip_grad_norm", "rope_theta"):
        if cfg[key] is not None and (not _is_number(cfg[key]) or cfg[key] <= 0):
            problems.append(f"{key} must be a positive number or null, got {cfg[key]!r}")
    resume = cfg.resume_from_checkpoint
    if not (resume is None or isinstance(resume, (bool, str))):
        problems.append(f"resume_from_checkpoint must be true, false or a step_N path, got {resume!r}")
    if cfg.overwrite_output_dir is True and resume not in (None, False):
        problems.append("resume_from_checkpoint and overwrite_output_dir exclude each other: "
                        "resume the run in output_dir, or move it aside and start anew")
    if _is_int(cfg.cp_degree) and _is_int(cfg.max_seq_len) and 1 < cfg.cp_degree and cfg.max_seq_len < 2 * cfg.cp_degree:
        problems.append(f"max_seq_len={cfg.max_seq_len} is too short for cp_degree={cfg.cp_degree}: "
                        "the zigzag layout gives each cp rank 2 chunks; use max_seq_len >= 2 * cp_degree")
    if cfg.dtype not in ("bf16", "fp32"):
        problems.append(f"dtype must be bf16 or fp32, got {cfg.dtype!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        problems.append(f"device must be auto, cpu or cuda, got {cfg.device!r}")
    return problems


def _component_problems(key: str, node: Any, passed: tuple[int, tuple[str, ...]]) -> list[str]:
    """Problems of a ``_component_`` node: an unimportable component, arguments it does not
    take (with the closest one), arguments the recipe passes itself, required ones missing."""
    if node is None and key in ("lr_scheduler", "metric_logger"):
        return []
    if not OmegaConf.is_dict(node) or "_component_" not in node:
        return [f"{key} must be a mapping with a _component_"]
    try:
        params = inspect.signature(_get_component_from_path(node._component_)).parameters
    except Exception as e:  # an import error, a misspelled name, a non-callable
        return [f"{key}._component_: cannot use {node._component_!r} ({type(e).__name__}: {e})".splitlines()[0]]
    n_positional, keywords = passed
    named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    given = set(named[:n_positional]) | set(keywords)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    problems = []
    for arg in (a for a in node if a != "_component_"):
        if arg in given:
            problems.append(f"{key}.{arg} is set by the recipe; remove it")
        elif arg not in named and not takes_any:
            close = difflib.get_close_matches(arg, [n for n in named if n not in given], n=1)
            problems.append(f"unknown key {key}.{arg}: {node._component_} takes no argument {arg!r}"
                            + (f" (did you mean {key}.{close[0]}?)" if close else ""))
    for name, p in params.items():
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) \
                and name not in given and name not in node:
            problems.append(f"missing key {key}.{name} (required by {node._component_})")
    return problems


def validate_config(cfg: DictConfig) -> DictConfig:
    """Check the keys of a recipe config and fill in defaults, before any work starts.

    The arguments under every ``_component_`` key (``optimizer.lr``, ...) are checked against
    the component's signature, so a misspelled nested key fails here, not after the model loads.

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
    problems = _value_problems(merged)
    for key, passed in _COMPONENTS.items():
        problems += _component_problems(key, merged[key], passed)
    if problems:
        raise ValueError("config error: " + "; ".join(problems))
    return merged
