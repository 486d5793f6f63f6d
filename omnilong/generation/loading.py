"""A checkpoint ready to answer prompts: native model (eval mode), tokenizer, and, when the
process runs under torchrun with several ranks, its meshes: the ranks split into
``world / cp_degree`` data-parallel groups of ``cp_degree`` consecutive ranks (group ``g`` holds
ranks ``g * cp_degree ..``), each group one model copy with ring attention over its ranks and
parameters FSDP-sharded within it (replicated across groups, i.e. HSDP). ``cp_degree`` 1: every
rank holds the whole model and no mesh is built. By default all ranks form one cp group.

A checkpoint is either a Hugging Face model directory (``config.json`` + safetensors) or a
training step folder (``output_dir/checkpoints/step_N``: DCP files and the run's
``config.yaml``, whose ``checkpoint_dir`` names the base model for the architecture and the
tokenizer, and whose ``rope_theta`` override is applied).
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from omnilong.checkpoint.dcp_io import load_model_tensors
from omnilong.checkpoint.training_state import RUN_CONFIG_NAME, is_complete_checkpoint
from omnilong.data.tokenizer import load_tokenizer
from omnilong.hf_io import read_hf_config
from omnilong.models.attention import check_attention_device
from omnilong.models.hf_loading import build_model_from_hf_config, check_state_dict_matches, load_native_state_dict
from omnilong.models.parallelize import apply_context_parallel
from omnilong.parallel.fsdp import apply_fsdp
from omnilong.parallel.mesh import ParallelDims, ParallelMeshes, build_mesh

logger = logging.getLogger(__name__)


@dataclass
class InferenceModel:
    """What the evaluations need of a loaded checkpoint.

    Attributes:
        model: the native model, eval mode.
        tokenizer: the checkpoint's (or its base model's) tokenizer.
        hf_config: the parsed ``config.json`` the model was built from.
        model_dir: the Hugging Face directory holding config, tokenizer and processor files.
        device: where inputs go.
        meshes: the meshes when the model runs over several cp ranks (mesh
            ``(dp_replicate = groups, dp_shard = 1, cp)``), else ``None``.
    """

    model: nn.Module
    tokenizer: Any
    hf_config: dict[str, Any]
    model_dir: Path
    device: torch.device
    meshes: ParallelMeshes | None = None

    @property
    def cp_mesh(self) -> DeviceMesh | None:
        """The cp mesh prompts are sharded over, or ``None`` on one device."""
        return None if self.meshes is None else self.meshes.cp

    @property
    def is_main(self) -> bool:
        """Whether this process writes results (rank 0, or the only process)."""
        return not dist.is_initialized() or dist.get_rank() == 0


def describe_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any], Path | None]:
    """``(model_dir, text_overrides, step_dir)`` of a checkpoint path: the Hugging Face directory
    with its architecture and tokenizer, the args its run changed, and the DCP step folder
    holding its weights (``None``: the weights are the HF directory's).

    Raises:
        FileNotFoundError: ``path`` is neither a step folder nor a model directory.
    """
    path = Path(path)
    if is_complete_checkpoint(path):
        run_config = path / RUN_CONFIG_NAME
        if not run_config.is_file():
            raise FileNotFoundError(
                f"{path} is a step folder without its {RUN_CONFIG_NAME}: cannot tell its base "
                "model; convert it with tools/convert_checkpoint.py --base <model dir> first"
            )
        cfg = OmegaConf.load(run_config)
        overrides = {} if cfg.get("rope_theta") is None else {"rope_theta": float(cfg.rope_theta)}
        return Path(cfg.checkpoint_dir), overrides, path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a checkpoint (neither a step_N folder with .metadata nor a "
            "Hugging Face model directory with config.json)"
        )
    return path, {}, None


def _read_weights(model: nn.Module, model_dir: Path, step_dir: Path | None, dtype: torch.dtype) -> dict:
    weights = load_native_state_dict(model_dir, dtype) if step_dir is None else load_model_tensors(step_dir)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in check_state_dict_matches(model, weights).items()}


def load_inference_model(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_dir: str | Path | None = None,
    cp_degree: int | None = None,
) -> InferenceModel:
    """Load a checkpoint for generation. Without a process group of several ranks the model is
    whole on ``device``. With one (torchrun), the ranks form groups of ``cp_degree`` (default:
    all ranks one group): in each, ring attention over its ranks and parameters FSDP-sharded
    over them, rank 0 reading the weights and sending each rank its shards; with
    ``cp_degree`` 1 every rank reads the whole model itself.

    Raises:
        FileNotFoundError, ValueError: a bad checkpoint path, weights that do not match, a
            ``cp_degree`` that does not divide the number of ranks, or a GPU that cannot run
            the attention kernel (``check_attention_device``).
    """
    check_attention_device(device, dtype)
    model_dir, overrides, step_dir = describe_checkpoint(path)
    hf_config = read_hf_config(model_dir)
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    with torch.device("meta"):
        model = build_model_from_hf_config(hf_config, **overrides)
    world = dist.get_world_size() if dist.is_initialized() else 1
    cp = world if cp_degree is None else cp_degree
    if cp < 1 or world % cp:
        raise ValueError(f"cp_degree {cp} must divide the number of ranks ({world}): pick a divisor of {world}")
    meshes = None
    if cp == 1:
        model.load_state_dict(_read_weights(model, model_dir, step_dir, dtype), assign=True)
        if model.args.tie_word_embeddings:
            model.output.weight = model.tok_embeddings.weight
        model.to(device)
    else:
        meshes = build_mesh(ParallelDims.resolve(world, world // cp, 1, cp), device.type)
        apply_context_parallel(hf_config, model, meshes.cp)
        apply_fsdp(model, meshes, param_dtype=None if dtype == torch.float32 else dtype)  # shards stay fp32
        model.to_empty(device=device)
        weights = _read_weights(model, model_dir, step_dir, dtype) if dist.get_rank() == 0 else {}
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    logger.info(
        "loaded %s (%s) on %d rank(s): %d group(s) of %d cp rank(s)",
        path,
        model_dir if step_dir else "Hugging Face directory",
        world,
        world // cp,
        cp,
    )
    return InferenceModel(model.eval(), tokenizer, hf_config, model_dir, device, meshes)
