"""FSDP2 sharding (with optional CPU offload) and activation checkpointing, applied from outside
the model."""

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from omnilong.parallel.mesh import ParallelMeshes


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The repeated blocks of ``model``: its decoder layers, and its vision tower's blocks if any."""
    visual = getattr(model, "visual", None)
    return [model.layers] + ([visual.layers] if visual is not None else [])


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's (and vision block's) activations in backward
    (non-reentrant checkpointing). State-dict keys are unchanged (the wrapper strips its
    own prefix)."""
    for blocks in _block_lists(model):
        for index, block in enumerate(blocks):
            blocks[index] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_fsdp(
    model: nn.Module,
    meshes: ParallelMeshes,
    cpu_offload: bool = False,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype = torch.float32,
) -> None:
    """``fully_shard`` each decoder layer and vision block, then the root (embeddings, final
    norm, output, vision patch embedding and merger).

    Parameters are sharded over ``dp_shard x cp`` (replicated over ``dp_replicate``,
    i.e. HSDP, when that degree is > 1). Gradients are *summed* across ranks, not
    averaged: the recipe divides the loss by the global token count itself.

    Args:
        model: a model with a ``layers`` ModuleList (and optionally a ``visual`` tower with
            ``layers``), parameters on the meta device.
        meshes: the meshes of :func:`omnilong.parallel.mesh.build_mesh`.
        cpu_offload: keep sharded parameters, gradients and optimizer state on CPU.
        param_dtype: compute dtype of the unsharded parameters (``None``: as stored).
        reduce_dtype: dtype of gradient reduction.
    """
    if meshes.world["dp_replicate"].size() > 1:
        fsdp_mesh = meshes.world["dp_replicate", "dp_shard_cp"]  # HSDP: replicate across, shard within
    else:
        fsdp_mesh = meshes.dp_shard_cp
    kwargs = dict(
        mesh=fsdp_mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
    )
    if cpu_offload:
        # Pinned host memory speeds up host-device copies; there are none on a CPU-only mesh.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=meshes.world.device_type == "cuda")
    for blocks in _block_lists(model):
        for block in blocks:
            fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    sum_gradients_across_ranks(model)


def sum_gradients_across_ranks(model: nn.Module) -> None:
    """Make every FSDP module of ``model`` reduce gradients with a plain sum over ranks
    (FSDP2 averages by default). OmniLong's loss on each rank is its share of the global
    objective (token-loss sum / global token count), so the gradients must add up."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
