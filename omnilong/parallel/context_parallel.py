"""Context parallelism's generic mechanisms: ring attention swapped in for a model's attention
cores, a full-sequence batch cut into this rank's zigzag shard, and the pieces a vision tower's
split over the cp ranks is built from (each family's ``parallelize`` module spreads its own tower:
``omnilong.models.<family>.parallelize``)."""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from omnilong.constants import PIXEL_KEYS
from omnilong.models.attention import CausalAttention
from omnilong.parallel.ring_attention import RingAttention
from omnilong.parallel.sequence_sharding import pad_batch, shard_batch


def apply_ring_attention(model: nn.Module, cp_mesh: DeviceMesh) -> int:
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


def shard_batch_for_cp(
    batch: dict[str, torch.Tensor], cp_mesh: DeviceMesh, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """This cp rank's zigzag shard of a full-sequence batch (padded to a multiple of ``2 * cp``
    first: padding has ignored labels and a document of its own).

    Everything position-dependent (labels already shifted, position ids, document ids, and
    for vision inputs ``vision_token_index``: which feature each pad token takes) is computed on
    the full sequence before this cut. Vision inputs (pixels, grids) are not sequence-shaped and
    pass whole.

    Raises:
        ValueError: a batch with vision inputs but no ``vision_token_index`` (a shard could not
            tell which features its pad tokens take).
    """
    if any(key in batch for key in PIXEL_KEYS) and "vision_token_index" not in batch:
        raise ValueError(
            "a batch with vision inputs needs its vision_token_index before the context-parallel cut: "
            "omnilong.models.vision_tokens.with_vision_token_index(batch, model.vision_token_ids)"
        )
    cp = cp_mesh.size()
    return shard_batch(pad_batch(batch, cp, pad_token_id), cp_mesh.get_local_rank(), cp)


class GatherBlocks(torch.autograd.Function):
    """``[L, D]`` on each rank -> ``[n_ranks, L, D]`` everywhere (``GatherBlocks.apply(block, group)``).
    Backward: the gradient of every copy is summed over ranks (all-reduce) and each rank keeps
    its own block's. A vision tower's split gathers the features each rank encoded with it."""

    @staticmethod
    def forward(ctx, block: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.rank = group, dist.get_rank(group)
        blocks = [torch.empty_like(block) for _ in range(dist.get_world_size(group))]
        dist.all_gather(blocks, block.contiguous(), group=group)
        return torch.stack(blocks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def balanced_ranges(sizes: list[int], parts: int) -> list[tuple[int, int]]:
    """Split ``range(len(sizes))`` into ``parts`` contiguous ``(lo, hi)`` ranges of about equal
    total size: unit ``i`` goes to part ``floor(start_i * parts / total)``, ``start_i`` being
    the total size of the units before it. Ranges may be empty."""
    total, start, owners = max(sum(sizes), 1), 0, []
    for size in sizes:
        owners.append(start * parts // total)
        start += size
    ranges, i = [], 0
    for part in range(parts):
        lo = i
        while i < len(owners) and owners[i] == part:
            i += 1
        ranges.append((lo, i))
    return ranges
