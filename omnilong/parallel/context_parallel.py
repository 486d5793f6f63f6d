"""Context parallelism applied to a model and its batches: ring attention, zigzag shards,
and the vision tower's frames spread over the cp ranks."""

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from omnilong.models.attention import CausalAttention
from omnilong.models.qwen2_5_vl.model import vision_token_index
from omnilong.parallel.ring_attention import RingAttention
from omnilong.parallel.sequence_sharding import pad_batch, shard_batch

_VISION_KEYS = ("pixel_values", "pixel_values_videos")


def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh) -> int:
    """Swap every single-device attention core of ``model`` for ring attention over ``cp_mesh``,
    and spread its vision tower's frames over the cp ranks (:class:`ImageSplit` for a tower that
    encodes independent images, ``encodes_independent_images``; else :class:`VisionFrameSplit`,
    Qwen2.5-VL's frame pairs).

    Returns:
        The number of attention modules swapped.
    """
    swapped = 0
    for module in model.modules():
        if isinstance(getattr(module, "core", None), CausalAttention):
            module.core = RingAttention(cp_mesh)
            swapped += 1
    visual = getattr(model, "visual", None)
    if visual is not None:
        visual.split = (ImageSplit(cp_mesh) if getattr(visual, "encodes_independent_images", False)
                        else VisionFrameSplit(cp_mesh, visual.args.spatial_merge_size))
    return swapped


def shard_batch_for_cp(
    batch: dict[str, torch.Tensor], cp_mesh: DeviceMesh, pad_token_id: int,
    vision_token_ids: Sequence[Optional[int]] = (),
) -> dict[str, torch.Tensor]:
    """This cp rank's zigzag shard of a full-sequence batch (padded to a multiple of ``2 * cp``
    first: padding has ignored labels and a document of its own).

    Everything position-dependent (labels already shifted, position ids, document ids, and
    for vision inputs which feature each pad token takes) is computed on the full sequence
    before this cut. Vision inputs (pixels, grids) are not sequence-shaped and pass whole.
    """
    if any(key in batch for key in _VISION_KEYS):
        batch = {**batch, "vision_token_index": vision_token_index(batch["input_ids"], list(vision_token_ids))}
    cp = cp_mesh.size()
    return shard_batch(pad_batch(batch, cp, pad_token_id), cp_mesh.get_local_rank(), cp)


class _GatherBlocks(torch.autograd.Function):
    """``[L, D]`` on each rank -> ``[n_ranks, L, D]`` everywhere. Backward: the gradient of
    every copy is summed over ranks (all-reduce) and each rank keeps its own block's."""

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


def _frame_units(grids: list[list[int]]) -> list[tuple[int, int, int]]:
    """``(item, h, w)`` per temporal slice (frame pair) of every item, in processor order."""
    return [(item, h, w) for item, (t, h, w) in enumerate(grids) for _ in range(t)]


def _balanced_ranges(sizes: list[int], parts: int) -> list[tuple[int, int]]:
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


class VisionFrameSplit:
    """Encode a share of the frame pairs on each cp rank and give every rank all the features.

    Qwen2.5-VL's vision tower never attends across frame pairs (window blocks attend
    within windows of one frame pair, full-attention blocks within one frame pair), so a
    frame pair encoded alone gives the same features as inside its video. Frame pairs are
    dealt to the cp ranks in contiguous runs of about equal patch count, each rank encodes
    its run, and the features are all-gathered (their gradients summed back). Vision
    activation memory per rank is then ~1/cp of the whole. A rank with no frame pair
    encodes the first one as padding, so that every rank runs the same collectives
    forward and backward.

    Args:
        cp_mesh: the cp mesh (or its 1-D sub-mesh).
        merge: the tower's spatial merge size (features per frame pair = h * w / merge^2).
    """

    def __init__(self, cp_mesh: DeviceMesh, merge: int):
        self.group = cp_mesh.get_group()
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.merge = merge

    def __call__(
        self, encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            encode: the tower's single-device ``encode(pixel_values, grid_thw)``.
            pixel_values: ``[N, patch_dim]`` every item's patches (the same on every cp rank).
            grid_thw: ``[n_items, 3]``.

        Returns:
            ``[N / merge^2, out_dim]`` every item's features, as ``encode`` would give them.
        """
        units = _frame_units(grid_thw.tolist())
        patches = [h * w for _, h, w in units]
        offsets = [0]
        for n in patches:
            offsets.append(offsets[-1] + n)
        ranges = _balanced_ranges(patches, self.size)
        counts = [sum(patches[lo:hi]) // self.merge**2 for lo, hi in ranges]
        lo, hi = ranges[self.rank]
        if hi == lo:  # nothing to encode here: encode the first frame pair as padding
            lo, hi = 0, 1
        features = encode(pixel_values[offsets[lo]:offsets[hi]], self._grids(units[lo:hi], grid_thw.device))
        longest = max(max(counts), features.shape[0])
        block = F.pad(features, (0, 0, 0, longest - features.shape[0]))  # [longest, out_dim]
        gathered = _GatherBlocks.apply(block, self.group)  # [cp, longest, out_dim]
        return torch.cat([gathered[r, : counts[r]] for r in range(self.size)])

    @staticmethod
    def _grids(units: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
        """``[n, 3]`` grids of a run of frame pairs: consecutive pairs of one item become one grid."""
        grids: list[list[int]] = []
        previous = None
        for item, h, w in units:
            if item == previous:
                grids[-1][0] += 1
            else:
                grids.append([1, h, w])
            previous = item
        return torch.tensor(grids, device=device)


class ImageSplit:
    """Encode a share of the images (crops or frames) on each cp rank and give every rank all
    the features, for a tower that encodes each image on its own (LLaVA-OneVision's SigLIP).

    Images are dealt to the cp ranks in contiguous runs of about equal count, each rank
    encodes its run, and the features are all-gathered (their gradients summed back), as
    :class:`VisionFrameSplit` does with frame pairs. A rank with no image encodes the first
    one as padding, so that every rank runs the same collectives forward and backward.

    Args:
        cp_mesh: the cp mesh (or its 1-D sub-mesh).
    """

    def __init__(self, cp_mesh: DeviceMesh):
        self.group = cp_mesh.get_group()
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)

    def __call__(self, encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """
        Args:
            encode: the tower's single-device ``encode(images)``.
            images: ``[N, C, S, S]`` every image (the same on every cp rank).

        Returns:
            ``[N, L, D]`` every image's features, as ``encode`` would give them.
        """
        ranges = _balanced_ranges([1] * images.shape[0], self.size)
        lo, hi = ranges[self.rank]
        features = encode(images[lo:hi] if hi > lo else images[:1])  # [n, L, D]
        shape = features.shape[1:]
        longest = max(max(b - a for a, b in ranges), 1)
        block = F.pad(features.flatten(1), (0, 0, 0, longest - features.shape[0]))  # [longest, L * D]
        gathered = _GatherBlocks.apply(block, self.group)  # [cp, longest, L * D]
        return torch.cat([gathered[r, : b - a] for r, (a, b) in enumerate(ranges)]).view(-1, *shape)
