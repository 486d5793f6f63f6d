"""Qwen2.5-VL under context parallelism: ring attention in every decoder layer, and the vision
tower's frame pairs spread over the cp ranks (:class:`VisionFrameSplit`), with the generic
mechanisms of :mod:`omnilong.parallel.context_parallel`."""

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from omnilong.models.qwen2_5_vl.model import Qwen2_5_VL
from omnilong.parallel.context_parallel import GatherBlocks, apply_ring_attention, item_order
from omnilong.vision_shares import unit_share


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


class VisionFrameSplit:
    """Encode a share of the frame pairs on each cp rank and give every rank all the features.

    Qwen2.5-VL's vision tower never attends across frame pairs (window blocks attend
    within windows of one frame pair, full-attention blocks within one frame pair), so a
    frame pair encoded alone gives the same features as inside its video. Each item's frame
    pairs are dealt to the cp ranks by :func:`~omnilong.vision_shares.unit_share` (the rule the
    data uses to decode only a rank's share), each rank encodes its pairs, and the features are
    all-gathered (their gradients summed back) and put back in item order. Vision activation
    memory per rank is then ~1/cp of the whole. A rank with no frame pair encodes one blank
    ``merge x merge`` patch group as padding, so that every rank runs the same collectives
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
            pixel_values: ``[N, patch_dim]`` every item's patches, or ``[N_r, patch_dim]`` only this
                rank's share of them (each item's frame pairs of :func:`unit_share`, items in
                order: what a cp-aware dataset delivers). The row count tells them apart; the
                two are the same rows when this rank's share is everything.
            grid_thw: ``[n_items, 3]`` every item's grid.

        Returns:
            ``[N / merge^2, out_dim]`` every item's features, as ``encode`` would give them.

        Raises:
            ValueError: ``pixel_values`` has neither row count.
        """
        grids = grid_thw.tolist()
        shares = [[unit_share(t, r, self.size) for r in range(self.size)] for t, _, _ in grids]
        patches = [h * w for _, h, w in grids]  # per frame pair of each item
        local = self._local_rows(pixel_values, grids, [s[self.rank] for s in shares])
        mine = [[hi - lo, h, w] for (lo, hi), (_, h, w) in zip((s[self.rank] for s in shares), grids) if hi > lo]
        if mine:
            features = encode(local, torch.tensor(mine, device=grid_thw.device))
        else:  # nothing to encode here: a blank patch group keeps the collectives in step
            blank = pixel_values.new_zeros(self.merge**2, pixel_values.shape[1])
            features = encode(blank, torch.tensor([[1, self.merge, self.merge]], device=grid_thw.device))
        # features of rank r: item by item, (hi - lo) * h * w / merge^2 rows each
        sizes = [[(hi - lo) * n // self.merge**2 for lo, hi in item] for item, n in zip(shares, patches)]
        counts = [sum(item[r] for item in sizes) for r in range(self.size)]
        longest = max(max(counts), features.shape[0])
        block = F.pad(features, (0, 0, 0, longest - features.shape[0]))  # [longest, out_dim]
        gathered = GatherBlocks.apply(block, self.group).flatten(0, 1)  # [cp * longest, out_dim]
        return gathered[item_order(sizes, longest).to(gathered.device)]

    def _local_rows(
        self, pixel_values: torch.Tensor, grids: list[list[int]], mine: list[tuple[int, int]]
    ) -> torch.Tensor:
        """``[N_r, patch_dim]`` this rank's rows of ``pixel_values`` (all rows or the share)."""
        total = sum(t * h * w for t, h, w in grids)
        share = sum((hi - lo) * h * w for (lo, hi), (_, h, w) in zip(mine, grids))
        if pixel_values.shape[0] == share:
            return pixel_values
        if pixel_values.shape[0] != total:
            raise ValueError(
                f"{pixel_values.shape[0]} pixel rows for the grids {grids} on cp rank {self.rank}: expected all "
                f"{total} or this rank's share of {share}"
            )
        rows, offset = [], 0
        for (lo, hi), (t, h, w) in zip(mine, grids):
            rows.append(pixel_values[offset + lo * h * w : offset + hi * h * w])
            offset += t * h * w
        return torch.cat(rows)
