"""LLaVA-OneVision under context parallelism: ring attention in every decoder layer, and the
SigLIP tower's images (crops or frames) spread over the cp ranks (:class:`ImageSplit`), with the
generic mechanisms of :mod:`omnilong.parallel.context_parallel`."""

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from omnilong.models.llava_onevision.model import LlavaOnevision
from omnilong.parallel.context_parallel import GatherBlocks, apply_ring_attention, item_order
from omnilong.vision_shares import unit_share


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

    Each video's frames (or, without video boundaries, all the images as one run) are dealt to
    the cp ranks by :func:`~omnilong.vision_shares.unit_share` (the rule the data uses to decode
    only a rank's share), each rank encodes its frames, and the features are all-gathered (their
    gradients summed back) and put back in order, as Qwen2.5-VL's
    :class:`~omnilong.models.qwen2_5_vl.parallelize.VisionFrameSplit` does with frame pairs. A
    rank with no image encodes one blank image as padding, so that every rank runs the same
    collectives forward and backward.

    Args:
        cp_mesh: the cp mesh (or its 1-D sub-mesh).
    """

    def __init__(self, cp_mesh: DeviceMesh):
        self.group = cp_mesh.get_group()
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)

    def __call__(
        self, encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, counts: list[int] | None = None
    ) -> torch.Tensor:
        """
        Args:
            encode: the tower's single-device ``encode(images)``.
            images: ``[N, C, S, S]`` every image, or ``[N_r, C, S, S]`` only this rank's share
                (each video's frames of :func:`unit_share`, videos in order: what a cp-aware
                dataset delivers). The count tells them apart; the two are the same images
                when this rank's share is everything.
            counts: frames of each video (summing to ``N``); ``None``: all the images are one run.

        Returns:
            ``[N, L, D]`` every image's features, as ``encode`` would give them.

        Raises:
            ValueError: ``images`` has neither count (or ``counts`` is needed to tell).
        """
        if counts is None:
            counts = [images.shape[0]]
        shares = [[unit_share(n, r, self.size) for r in range(self.size)] for n in counts]
        mine = [item[self.rank] for item in shares]
        local = self._local_images(images, counts, mine)
        features = encode(local if local.shape[0] else images.new_zeros(1, *images.shape[1:]))  # [n, L, D]
        shape = features.shape[1:]
        sizes = [[hi - lo for lo, hi in item] for item in shares]
        longest = max(max(sum(item[r] for item in sizes) for r in range(self.size)), features.shape[0])
        block = F.pad(features.flatten(1), (0, 0, 0, longest - features.shape[0]))  # [longest, L * D]
        gathered = GatherBlocks.apply(block, self.group).flatten(0, 1)  # [cp * longest, L * D]
        return gathered[item_order(sizes, longest).to(gathered.device)].view(-1, *shape)

    def _local_images(self, images: torch.Tensor, counts: list[int], mine: list[tuple[int, int]]) -> torch.Tensor:
        """``[N_r, C, S, S]`` this rank's images of ``images`` (all of them or the share)."""
        share = sum(hi - lo for lo, hi in mine)
        if images.shape[0] == share:
            return images
        if images.shape[0] != sum(counts):
            raise ValueError(
                f"{images.shape[0]} images for videos of {counts} frames on cp rank {self.rank}: expected all "
                f"{sum(counts)} or this rank's share of {share}"
            )
        starts = [0]
        for n in counts[:-1]:
            starts.append(starts[-1] + n)
        return torch.cat([images[start + lo : start + hi] for start, (lo, hi) in zip(starts, mine)])
