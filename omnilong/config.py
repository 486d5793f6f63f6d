"""The recipe's config keys: which are required, their defaults, and early validation."""

import difflib
import importlib
import importlib.util
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

REQUIRED = object()  # the default of a key every config must set


@dataclass(frozen=True)
class Key:
    """One top-level config key: its default (:data:`REQUIRED` when a config must set it) and
    what it means, in one line (``omnilong keys`` prints these; docs/configuration.md's table is
    generated from them)."""

    name: str
    default: Any
    meaning: str


KEYS: tuple[Key, ...] = (
    Key("checkpoint_dir", REQUIRED, "local HF model directory (config.json + safetensors)"),
    Key("output_dir", REQUIRED, "metrics, resolved config, checkpoints, HF export"),
    Key(
        "max_seq_len",
        REQUIRED,
        "tokens per row (stage 1) / most tokens per sample, and per packed row (`dataset.packed`), in stages 2 and 3",
    ),
    Key("max_steps", REQUIRED, "optimizer steps"),
    Key(
        "dataset",
        REQUIRED,
        "`_component_` building the dataset; gets the tokenizer and `max_seq_len`, and "
        "the checkpoint's parsed config.json as `model_config` when it takes one (the video datasets: "
        "frames cut as the checkpoint's tower cuts them)",
    ),
    Key("optimizer", REQUIRED, "e.g. `torch.optim.AdamW` with its arguments; gets the trainable parameters"),
    Key(
        "lr_scheduler",
        None,
        "e.g. `omnilong.lr_schedules.cosine_schedule_with_warmup` (or torchtune's, or any scheduler) with "
        "`num_warmup_steps` (`num_training_steps` = `max_steps`)",
    ),
    Key(
        "loss",
        {"_component_": "omnilong.loss.ChunkedLinearCrossEntropy"},
        "`omnilong.loss.FullLogitsCrossEntropy` to compare",
    ),
    Key("tokenizer_dir", None, "where the tokenizer and chat template come from; null: `checkpoint_dir`"),
    Key("device", "auto", "`auto`, `cuda` or `cpu`"),
    Key(
        "dtype", "bf16", "compute dtype, `bf16` or `fp32`; sharded parameters, gradients and optimizer state stay fp32"
    ),
    Key("seed", 0, "model init and data order"),
    Key("batch_size", 1, "rows per data-parallel rank per micro-step"),
    Key("gradient_accumulation_steps", 1, "micro-steps per optimizer step"),
    Key("shuffle", True, "shuffle rows each epoch"),
    Key("num_workers", 0, "dataloader worker processes"),
    Key("clip_grad_norm", 1.0, "max gradient norm; null: no clipping (the norm is still logged)"),
    Key("freeze_vision", True, "the vision tower keeps its weights: no gradients, no optimizer state"),
    Key(
        "freeze_projector",
        None,
        "the vision-to-text projector (LLaVA-OneVision's `multi_modal_projector`, "
        "Qwen2.5-VL's merger) likewise; null: as `freeze_vision`",
    ),
    Key("rope_theta", None, "RoPE base override (long-context pretraining raises it); null: the checkpoint's"),
    Key("dp_replicate_degree", 1, "HSDP replicas (e.g. one per node); parameters are sharded within each"),
    Key("dp_shard_degree", -1, "FSDP shard degree; -1: the ranks left after `dp_replicate` and `cp`"),
    Key("cp_degree", 1, "context parallelism: each sequence split across this many ranks (ring attention)"),
    Key(
        "fsdp_cpu_offload",
        False,
        "parameters, gradients and optimizer state on CPU; the optimizer steps on CPU "
        "(torch's fused CPU AdamW, docs/parallelism-and-memory.md)",
    ),
    Key(
        "cpu_threads_per_rank",
        None,
        "CPU threads of each rank (the offloaded optimizer step); null: the node's "
        "cores divided among its ranks (torchrun would give each rank 1), or `OMP_NUM_THREADS` when set",
    ),
    Key("enable_activation_checkpointing", True, "recompute each decoder layer in backward"),
    Key(
        "activation_offload",
        False,
        "CUDA: the saved activations (each checkpointed layer's input) go to pinned "
        "host memory in the forward and come back one layer ahead in the backward; on CPU accepted and does nothing",
    ),
    Key(
        "mlp_chunk_size",
        None,
        "tokens per chunk of each decoder layer's norm + MLP, each chunk checkpointed: a "
        "layer's recompute peak grows with the chunk, not the sequence (one more MLP forward per step); null: whole",
    ),
    Key("save_every_n_steps", None, "write a resumable checkpoint every N steps and at the last"),
    Key("keep_last_n_checkpoints", 2, "older checkpoints of the same run are deleted (never another run's)"),
    Key("resume_from_checkpoint", False, "`true`: the latest under `output_dir/checkpoints`; or a `step_N` path"),
    Key(
        "overwrite_output_dir",
        False,
        "start anew in an `output_dir` holding another run: the old run is moved "
        "to `<output_dir>.old-N`, never deleted",
    ),
    Key(
        "allow_config_change_on_resume",
        False,
        "resume although the model, data or optimizer keys differ from the checkpoint's `config.yaml`, "
        "or the data from its `data.json` (sources' contents and counts, rows)",
    ),
    Key("save_hf_at_end", False, "export the final weights to `output_dir/hf` as a Hugging Face model"),
    Key(
        "metric_logger",
        None,
        "a torchtune logger, e.g. `torchtune.training.metric_logging.TensorBoardLogger` "
        "(`log_dir`) or `WandBLogger` (extra `wandb`)",
    ),
    Key("log_every_n_steps", 1, "metrics cadence: a `metrics.jsonl` record (and log line) every N steps"),
    Key(
        "validation_dataset",
        None,
        "held-out `_component_` like `dataset` (same tokenizer and `max_seq_len`); "
        "its loss is `val_loss` in the metrics",
    ),
    Key("eval_every_n_steps", None, "evaluate `validation_dataset` every N steps; null: at the last step only"),
    Key(
        "max_empty_steps",
        5,
        "stop (status 1) when this many steps in a row train no token on any rank (every sample unusable "
        "or without a trained token); null: never",
    ),
    Key(
        "max_skipped_share",
        0.5,
        "stop (status 1) when more than this share of the rows this run has drawn held an unusable, skipped "
        "sample (judged from the 20th row on; a row is one sample unless packed); null: never",
    ),
    # the data loader (issue 25)
    Key(
        "prefetch_factor",
        1,
        "batches (of `batch_size` samples) each worker prepares ahead (with `num_workers` > 0): a rank holds up to "
        "`num_workers` x this many; 1 keeps stage 3's loader ahead of the 7B step (docs/benchmarks.md: Stage-3 "
        "video sample)",
    ),
)

REQUIRED_KEYS = tuple(k.name for k in KEYS if k.default is REQUIRED)
DEFAULTS: dict[str, Any] = {k.name: k.default for k in KEYS if k.default is not REQUIRED}

_POSITIVE_INTS = (
    "max_seq_len",
    "max_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "log_every_n_steps",
    "dp_replicate_degree",
    "cp_degree",
    "keep_last_n_checkpoints",
    "prefetch_factor",
)
_BOOLS = (
    "shuffle",
    "freeze_vision",
    "fsdp_cpu_offload",
    "enable_activation_checkpointing",
    "save_hf_at_end",
    "overwrite_output_dir",
    "allow_config_change_on_resume",
    "activation_offload",
)
# Component keys -> what the recipe passes itself: (number of positional arguments, keyword arguments).
_COMPONENTS: dict[str, tuple[int, tuple[str, ...]]] = {
    "dataset": (1, ("max_seq_len", "model_config")),  # the tokenizer; model_config: when the component takes it
    "validation_dataset": (1, ("max_seq_len", "model_config")),
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
    for key in ("save_every_n_steps", "eval_every_n_steps", "max_empty_steps"):
        if cfg[key] is not None and (not _is_int(cfg[key]) or cfg[key] <= 0):
            problems.append(f"{key} must be a positive integer or null, got {cfg[key]!r}")
    if cfg.eval_every_n_steps is not None and cfg.validation_dataset is None:
        problems.append(
            "eval_every_n_steps is set but validation_dataset is not: add a validation_dataset "
            "or remove eval_every_n_steps"
        )
    if cfg.cpu_threads_per_rank is not None and (
        not _is_int(cfg.cpu_threads_per_rank) or cfg.cpu_threads_per_rank <= 0
    ):
        problems.append(f"cpu_threads_per_rank must be a positive integer or null, got {cfg.cpu_threads_per_rank!r}")
    if cfg.mlp_chunk_size is not None and (not _is_int(cfg.mlp_chunk_size) or cfg.mlp_chunk_size <= 0):
        problems.append(f"mlp_chunk_size must be a positive number of tokens or null, got {cfg.mlp_chunk_size!r}")
    for key in _BOOLS:
        if not isinstance(cfg[key], bool):
            problems.append(f"{key} must be true or false, got {cfg[key]!r}")
    if cfg.freeze_projector is not None and not isinstance(cfg.freeze_projector, bool):
        problems.append(f"freeze_projector must be true, false or null, got {cfg.freeze_projector!r}")
    share = cfg.max_skipped_share
    if share is not None and (not _is_number(share) or not 0 <= share <= 1):
        problems.append(f"max_skipped_share must be a number from 0 to 1 or null, got {share!r}")
    for key in ("clip_grad_norm", "rope_theta"):
        if cfg[key] is not None and (not _is_number(cfg[key]) or cfg[key] <= 0):
            problems.append(f"{key} must be a positive number or null, got {cfg[key]!r}")
    resume = cfg.resume_from_checkpoint
    if not (resume is None or isinstance(resume, (bool, str))):
        problems.append(f"resume_from_checkpoint must be true, false or a step_N path, got {resume!r}")
    if cfg.overwrite_output_dir is True and resume not in (None, False):
        problems.append(
            "resume_from_checkpoint and overwrite_output_dir exclude each other: "
            "resume the run in output_dir, or move it aside and start anew"
        )
    if (
        _is_int(cfg.cp_degree)
        and _is_int(cfg.max_seq_len)
        and 1 < cfg.cp_degree
        and cfg.max_seq_len < 2 * cfg.cp_degree
    ):
        problems.append(
            f"max_seq_len={cfg.max_seq_len} is too short for cp_degree={cfg.cp_degree}: "
            "the zigzag layout gives each cp rank 2 chunks; use max_seq_len >= 2 * cp_degree"
        )
    if cfg.dtype not in ("bf16", "fp32"):
        problems.append(f"dtype must be bf16 or fp32, got {cfg.dtype!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        problems.append(f"device must be auto, cpu or cuda, got {cfg.device!r}")
    return problems


def component_from_path(path: str) -> Any:
    """The object a ``_component_`` dotted path names (``torch.optim.AdamW``), importing the
    longest importable module prefix and reading the rest as attributes.

    Raises:
        ImportError: no prefix of ``path`` is an importable module, or the import failed.
        AttributeError: the module has no such attribute.
    """
    parts = path.split(".")
    if not all(parts):
        raise ImportError(f"{path!r} is not a dotted path such as torch.optim.AdamW")
    for n in range(len(parts), 0, -1):
        module_name = ".".join(parts[:n])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and not (module_name == e.name or module_name.startswith(e.name + ".")):
                raise  # the module exists; a module it imports is missing
            continue
        for i, attribute in enumerate(parts[n:], start=n):
            if not hasattr(obj, attribute):
                raise AttributeError(f"{'.'.join(parts[:i])} has no attribute {attribute!r}")
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(f"no module named {parts[0]!r}")


def instantiate(node: DictConfig, *args: Any, **kwargs: Any) -> Any:
    """``node._component_(*args, **arguments)``: the node's other entries are keyword arguments
    (interpolations resolved, as plain Python containers), updated by ``kwargs``. The same
    contract as torchtune's ``config.instantiate``, without importing torchtune (about 2 s of
    start-up per rank, with torchao)."""
    arguments = OmegaConf.to_container(node, resolve=True)
    component = component_from_path(arguments.pop("_component_"))
    return component(*args, **{**arguments, **kwargs})


def _component_parameters(node: DictConfig) -> Mapping[str, inspect.Parameter]:
    """The parameters of a component node's ``_component_`` (imported by its dotted path)."""
    return inspect.signature(component_from_path(node._component_)).parameters


def takes_argument(node: DictConfig, argument: str) -> bool:
    """Whether the ``_component_`` of a (validated) component node has a parameter ``argument``."""
    return argument in _component_parameters(node)


def _component_problems(key: str, node: Any, passed: tuple[int, tuple[str, ...]]) -> list[str]:
    """Problems of a ``_component_`` node: an unimportable component, arguments it does not
    take (with the closest one), arguments the recipe passes itself, required ones missing."""
    if node is None and key in ("lr_scheduler", "metric_logger", "validation_dataset"):
        return []
    if not OmegaConf.is_dict(node) or "_component_" not in node:
        return [f"{key} must be a mapping with a _component_"]
    try:
        params = _component_parameters(node)
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
            problems.append(
                f"unknown key {key}.{arg}: {node._component_} takes no argument {arg!r}"
                + (f" (did you mean {key}.{close[0]}?)" if close else "")
            )
    for name, p in params.items():
        if (
            p.default is p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and name not in given
            and name not in node
        ):
            problems.append(f"missing key {key}.{name} (required by {node._component_})")
    return problems


# Metric loggers -> the package each one imports when built, and how to install it.
_LOGGER_PACKAGES = {
    "torchtune.training.metric_logging.WandBLogger": (
        "wandb",
        'the wandb extra: pip install -e ".[wandb]" (or OMNILONG_EXTRAS=wandb bash scripts/setup.sh)',
    ),
    "torchtune.training.metric_logging.TensorBoardLogger": ("tensorboard", "pip install tensorboard"),
    "torchtune.training.metric_logging.CometLogger": ("comet_ml", "pip install comet_ml"),
    "torchtune.training.metric_logging.MLFlowLogger": ("mlflow", "pip install mlflow"),
}


def _metric_logger_problems(node: Any) -> list[str]:
    """A metric logger whose package is not installed (it would fail after the model is built)."""
    if not OmegaConf.is_dict(node) or node.get("_component_") not in _LOGGER_PACKAGES:
        return []
    package, install = _LOGGER_PACKAGES[node._component_]
    if importlib.util.find_spec(package) is not None:
        return []
    return [
        f"metric_logger {node._component_} needs the {package!r} package, which is not installed: install {install}"
    ]


def _optimizer_problems(node: DictConfig) -> list[str]:
    """Hyper-parameters the optimizer refuses (``lr=-1``, ``betas`` outside [0, 1), ``eps`` < 0,
    ...), found by building it over one dummy parameter: torch's optimizers check them when
    built, so the check is the optimizer's own, for any optimizer, before the model loads."""
    import torch

    try:
        instantiate(node, [torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as e:
        return [f"optimizer {node._component_} refuses its arguments: {str(e).splitlines()[0]}"]
    except Exception:  # needs real parameters (a device, a shape): checked when built at setup
        return []
    return []


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
    problems += _metric_logger_problems(merged.metric_logger)
    if not problems:  # the optimizer's component and arguments are known good: build it once
        problems += _optimizer_problems(merged.optimizer)
    if problems:
        raise ValueError("config error: " + "; ".join(problems))
    return merged


def _default_text(value: Any) -> str:
    """A key's default as docs/configuration.md shows it: ``required``, ``null``, ``true``, the component name."""
    if value is REQUIRED:
        return "required"
    if isinstance(value, dict):
        return f"`{value['_component_']}`"
    return OmegaConf.to_yaml({"v": value}).removeprefix("v: ").strip()


def keys_markdown() -> str:
    """The table of every config key (default and meaning) that docs/configuration.md holds."""
    rows = [f"| `{k.name}` | {_default_text(k.default)} | {k.meaning} |" for k in KEYS]
    return "\n".join(["| key | default | meaning |", "|---|---|---|", *rows]) + "\n"


def keys_text() -> str:
    """Every config key with its default and meaning, one aligned line each (``omnilong keys``, ``--help``)."""
    rows = [(k.name, _default_text(k.default).strip("`"), k.meaning.replace("`", "")) for k in KEYS]
    width = [max(len(r[i]) for r in rows) for i in (0, 1)]
    return "\n".join(f"{n:<{width[0]}}  {d:<{width[1]}}  {m}" for n, d, m in rows) + "\n"
