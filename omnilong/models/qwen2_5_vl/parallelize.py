"""Qwen2.5-VL under context parallelism: ring attention in every decoder layer, and the vision
tower's frame pairs spread over the cp ranks (:class:`VisionFrameSplit`), with the generic
mechanisms of :mod:`omnilong.parallel.context_parallel`."""

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from omnilong.models.qwen2_5_vl.model import Qwen2_5_VL
from omnilong.parallel.context_parallel import GatherBlocks, apply_ring_attention, balanced_ranges


def apply_context_parallel(model: Qwen2_5_VL, cp_mesh: DeviceMesh) -> int:
    """Swap every attention core of ``model`` for ring attention over ``cp_mesh`` and spread its
    vision tower's frame pairs over the cp ranks (:class:`VisionFrameSplit`).

    Returns:
        The number of attention modules swapped.
    """
    swapped = apply_ring_attention(model, cp_mesh)
    if model.visual is not None:
        model.visual.split = VisionFrameSplit(cp_mesh, model.visual.args.spatial_merge_size)
    return swapped


def _frame_units(grids: list[list[int]]) -> list[tuple[int, int, int]]:
    """``(item, h, w)`` per temporal slice (frame pair) of every item, in processor order."""
    return [(item, h, w) for item, (t, h, w) in enumerate(grids) for _ in range(t)]


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
        self,
        encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        pixel_values: torch.Tensor,
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
        ranges = balanced_ranges(patches, self.size)
        counts = [sum(patches[lo:hi]) // self.merge**2 for lo, hi in ranges]
        lo, hi = ranges[self.rank]
        if hi == lo:  # nothing to encode here: encode the first frame pair as padding
            lo, hi = 0, 1
        features = encode(pixel_values[offsets[lo] : offsets[hi]], self._grids(units[lo:hi], grid_thw.device))
        longest = max(max(counts), features.shape[0])
        block = F.pad(features, (0, 0, 0, longest - features.shape[0]))  # [longest, out_dim]
        gathered = GatherBlocks.apply(block, self.group)  # [cp, longest, out_dim]
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
