"""Each model family's context parallelism, chosen by a checkpoint's ``config.json`` ``model_type``
as :mod:`omnilong.models.families` chooses its builder.

A family's ``parallelize`` module (``omnilong.models.<family>.parallelize``) applies the generic
mechanisms of :mod:`omnilong.parallel` to its model: ring attention for every attention core, and
its vision tower's own split over the cp ranks. This registry is apart from the families'
so that building or loading a model never imports :mod:`omnilong.parallel`, whose ring attention
imports the models' attention kernels (the families registry in the middle would close the loop).
FSDP and activation checkpointing are the same for every family (:mod:`omnilong.parallel.fsdp`).
"""

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from omnilong.models.llava_onevision import parallelize as llava
from omnilong.models.qwen2_5_vl import parallelize as qwen

CONTEXT_PARALLEL: dict[str, Callable[[nn.Module, DeviceMesh], int]] = {
    "qwen2_5_vl": qwen.apply_context_parallel,
    "llava_onevision": llava.apply_context_parallel,
}


def apply_context_parallel(config: dict[str, Any], model: nn.Module, cp_mesh: DeviceMesh) -> int:
    """Context parallelism over ``cp_mesh`` for ``model``, built from the parsed ``config.json``
    ``config`` (its family's ``apply_context_parallel``).

    Returns:
        The number of attention modules swapped for ring attention.
    """
    return CONTEXT_PARALLEL[config["model_type"]](model, cp_mesh)
