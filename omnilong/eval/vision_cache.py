"""Reusing vision features across prompts that share video frames (V-NIAH's haystack).

Qwen2.5-VL's vision tower encodes every frame pair (temporal patch) on its own: a frame pair
gives the same features alone as inside its video (the fact context parallelism's
:class:`~omnilong.parallel.context_parallel.VisionFrameSplit` rests on). The haystack's frame
pairs are therefore encoded once and only the needle's are encoded per depth.

The cache sits on the tower's ``split`` hook (``visual.split(encode, pixel_values, grid_thw)``)
and wraps whatever split was there (the cp split, or none), so under context parallelism the
frame pairs it does encode are still spread over the cp ranks; every rank holds the same keys,
so all make the same calls.
"""

import contextlib
from collections.abc import Hashable
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn


class FramePairCache:
    """Features of frame pairs by caller-given keys.

    Before a forward, :meth:`expect` names the frame pairs of the coming video (one key per
    frame pair, in order); pairs with a known key are not encoded again. A forward without
    keys (or whose grids have another number of frame pairs) encodes everything.

    Args:
        merge: the tower's spatial merge size.
        inner: the split hook it replaces (``None``: encode here).
    """

    def __init__(self, merge: int, inner: Optional[Callable[..., torch.Tensor]] = None):
        self.merge, self.inner = merge, inner
        self.features: dict[Hashable, torch.Tensor] = {}
        self.keys: Optional[list[Hashable]] = None
        self.encoded = 0  # frame pairs encoded (the others came from the cache)

    def expect(self, keys: Sequence[Hashable]) -> None:
        """Name the frame pairs of the next vision forward (used once)."""
        self.keys = list(keys)

    def clear(self) -> None:
        self.features.clear()

    def _encode(self, encode: Callable, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return encode(pixel_values, grid_thw) if self.inner is None else self.inner(encode, pixel_values, grid_thw)

    def __call__(self, encode: Callable, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """``[N, patch_dim]`` patches of ``grid_thw [n, 3]`` -> ``[N / merge^2, out_dim]`` features."""
        units = [(h, w) for t, h, w in grid_thw.tolist() for _ in range(t)]  # one per frame pair
        keys, self.keys = self.keys, None
        if keys is None or len(keys) != len(units):
            self.encoded += len(units)
            return self._encode(encode, pixel_values, grid_thw)
        patches = [h * w for h, w in units]
        starts = [sum(patches[:i]) for i in range(len(units))]
        missing, seen = [], set(self.features)
        for i, key in enumerate(keys):
            if key not in seen:
                missing.append(i)
                seen.add(key)
        if missing:
            pixels = torch.cat([pixel_values[starts[i]:starts[i] + patches[i]] for i in missing])
            grids = torch.tensor([[1, *units[i]] for i in missing], device=grid_thw.device)
            features = self._encode(encode, pixels, grids).split([patches[i] // self.merge**2 for i in missing])
            self.features.update({keys[i]: f for i, f in zip(missing, features)})
            self.encoded += len(missing)
        return torch.cat([self.features[key] for key in keys])


@contextlib.contextmanager
def frame_pair_cache(model: nn.Module) -> Iterator[FramePairCache]:
    """Inside, ``model.visual`` encodes through a :class:`FramePairCache`; the previous split
    hook is back on exit."""
    visual = model.visual
    previous = visual.split
    cache = FramePairCache(visual.args.spatial_merge_size, previous)
    visual.split = cache
    try:
        yield cache
    finally:
        visual.split = previous
