"""Context parallelism applied to a model and its batches: ring attention and zigzag shards."""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from omnilong.models.attention import CausalAttention
from omnilong.parallel.ring_attention import RingAttention
from omnilong.parallel.sequence_sharding import pad_batch, shard_batch


def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh) -> int:
    """Swap every single-device attention core of ``model`` for ring attention over ``cp_mesh``.

    Returns:
        The number of attention modules swapped.
    """
    swapped = 0
    for module in model.modules():
        if isinstance(getattr(module, "core", None), CausalAttention):
            module.core = RingAttention(cp_mesh)
            swapped += 1
    return swapped


def shard_batch_for_cp(batch: dict[str, torch.Tensor], cp_mesh: DeviceMesh, pad_token_id: int) -> dict[str, torch.Tensor]:
    """This cp rank's zigzag shard of a full-sequence batch (padded to a multiple of ``2 * cp``
    first: padding has ignored labels and a document of its own).

    Everything position-dependent (labels already shifted, position ids, document ids)
    must have been computed on the full sequence before this call.
    """
    cp = cp_mesh.size()
    return shard_batch(pad_batch(batch, cp, pad_token_id), cp_mesh.get_local_rank(), cp)
