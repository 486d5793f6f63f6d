"""Context parallelism's generic mechanisms: ring attention swapped in for a model's attention
cores, a full-sequence batch cut into this rank's zigzag shard, and the pieces a vision tower's
split over the cp ranks is built from (each family's ``parallelize`` module spreads its own tower:
``omnilong.models.<family>.parallelize``)."""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from omnilong.constants import IGNORE_INDEX, PIXEL_KEYS
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


def agree_on_decode_failures(
    batch: dict[str, torch.Tensor], cp_mesh: DeviceMesh
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Make the cp ranks of a group agree on the samples whose videos some rank could not decode.

    Under context parallelism each rank decodes only its share of a video's frames, so a corrupt
    stretch of a video is seen by one rank alone (see ``VideoSFTDataset.decode_cp_share``). One
    all-reduce (max) of ``decode_failures`` over the cp group tells every rank; each then drops
    those samples alike: their labels ignored (no loss, no trained token, no gradient: attention
    never crosses samples, and the tower encodes each frame unit on its own) and each counted in
    ``skipped``.

    Args:
        batch: a full-sequence batch with ``decode_failures [B, T]`` (``1 + the sample's index``
            on each token of a sample this rank could not decode, else 0), ``labels [B, T]`` and
            optionally ``skipped [B]``.
        cp_mesh: the cp mesh.

    Returns:
        ``batch`` without ``decode_failures``, those samples' labels ignored and counted in
        ``skipped``; and the failed samples' dataset indices, ascending, the same on every rank.
    """
    batch = dict(batch)
    failures = batch.pop("decode_failures").to(torch.device(cp_mesh.device_type))
    dist.all_reduce(failures, op=dist.ReduceOp.MAX, group=cp_mesh.get_group())
    failures = failures.cpu()
    failed = failures > 0
    if not bool(failed.any()):
        return batch, []
    batch["labels"] = batch["labels"].masked_fill(failed, IGNORE_INDEX)
    if "skipped" in batch:
        per_row = torch.tensor([len(row[row > 0].unique()) for row in failures])
        batch["skipped"] = batch["skipped"].long() + per_row
    return batch, sorted((failures[failed].unique() - 1).tolist())


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


def item_order(sizes: list[list[int]], longest: int) -> torch.Tensor:
    """Where each item's rows lie in gathered blocks: ``[sum of sizes]`` row indices into
    ``[n_ranks * longest]`` (the gathered ``[n_ranks, longest]`` blocks flattened) that put the rows
    back in item order, each item's rank-0 rows first, then its rank-1 rows, ...

    Args:
        sizes: ``sizes[item][rank]`` rows of the item that ``rank`` holds, each rank's rows
            in item order at the start of its block.
        longest: rows per block.
    """
    starts, index = [0] * (len(sizes[0]) if sizes else 0), []
    for item in sizes:
        for rank, n in enumerate(item):
            index.append(torch.arange(rank * longest + starts[rank], rank * longest + starts[rank] + n))
            starts[rank] += n
    return torch.cat(index)
