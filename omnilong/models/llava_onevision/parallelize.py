"""LLaVA-OneVision under context parallelism: ring attention in every decoder layer, and the
SigLIP tower's images (crops or frames) spread over the cp ranks (:class:`ImageSplit`), with the
generic mechanisms of :mod:`omnilong.parallel.context_parallel`."""

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from omnilong.models.llava_onevision.model import LlavaOnevision
from omnilong.parallel.context_parallel import GatherBlocks, apply_ring_attention, balanced_ranges


def apply_context_parallel(model: LlavaOnevision, cp_mesh: DeviceMesh) -> int:
    """Swap every attention core of ``model`` for ring attention over ``cp_mesh`` and spread its
    vision tower's images over the cp ranks (:class:`ImageSplit`).

    Returns:
        The number of attention modules swapped.
    """
    swapped = apply_ring_attention(model, cp_mesh)
    if model.visual is not None:
        model.visual.split = ImageSplit(cp_mesh)
    return swapped


class ImageSplit:
    """Encode a share of the images (crops or frames) on each cp rank and give every rank all
    the features, for a tower that encodes each image on its own (LLaVA-OneVision's SigLIP).

    Images are dealt to the cp ranks in contiguous runs of about equal count, each rank
    encodes its run, and the features are all-gathered (their gradients summed back), as
    Qwen2.5-VL's :class:`~omnilong.models.qwen2_5_vl.parallelize.VisionFrameSplit` does with
    frame pairs. A rank with no image encodes the first
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
        ranges = balanced_ranges([1] * images.shape[0], self.size)
        lo, hi = ranges[self.rank]
        features = encode(images[lo:hi] if hi > lo else images[:1])  # [n, L, D]
        shape = features.shape[1:]
        longest = max(max(b - a for a, b in ranges), 1)
        block = F.pad(features.flatten(1), (0, 0, 0, longest - features.shape[0]))  # [longest, L * D]
        gathered = GatherBlocks.apply(block, self.group)  # [cp, longest, L * D]
        return torch.cat([gathered[r, : b - a] for r, (a, b) in enumerate(ranges)]).view(-1, *shape)
