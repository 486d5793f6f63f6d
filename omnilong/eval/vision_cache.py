"""Reusing vision features across prompts that share video frames (V-NIAH's haystack).

Both families' towers encode each unit of a video on its own: Qwen2.5-VL every frame pair
(temporal patch; the fact context parallelism's
:class:`~omnilong.models.qwen2_5_vl.parallelize.VisionFrameSplit` rests on), LLaVA-OneVision's
SigLIP every frame (:class:`~omnilong.models.llava_onevision.parallelize.ImageSplit`). A unit gives the
same features alone as inside its video, so the haystack's units are encoded once and only
the needle's are encoded per depth.

A cache sits on the tower's ``split`` hook (Qwen2.5-VL: ``visual.split(encode, pixel_values,
grid_thw)``, LLaVA-OneVision: ``visual.split(encode, images, counts)``) and wraps whatever split was
there (the cp split, or none), so under context parallelism the units it does encode are still
spread over the cp ranks; every rank holds the same keys, so all make the same calls.
"""

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence

import torch
from torch import nn


def _first_unknown(keys: Sequence[Hashable], known: dict) -> list[int]:
    """Indices of the first occurrence of each key of ``keys`` not in ``known``."""
    missing, seen = [], set(known)
    for i, key in enumerate(keys):
        if key not in seen:
            missing.append(i)
            seen.add(key)
    return missing


class _KeyedFeatures:
    """Features by caller-given keys: :meth:`expect` names the units of the next vision forward
    (one key per unit, in order); units with a known key are not encoded again. A forward
    without keys (or with another number of units) encodes everything."""

    def __init__(self, inner: Callable[..., torch.Tensor] | None = None):
        self.inner = inner
        self.features: dict[Hashable, torch.Tensor] = {}
        self.keys: list[Hashable] | None = None
        self.encoded = 0  # units encoded (the others came from the cache)

    def expect(self, keys: Sequence[Hashable]) -> None:
        """Name the units of the next vision forward (used once)."""
        self.keys = list(keys)

    def clear(self) -> None:
        self.features.clear()


class FramePairCache(_KeyedFeatures):
    """Features of Qwen2.5-VL frame pairs by key (one key per frame pair).

    Args:
        merge: the tower's spatial merge size.
        inner: the split hook it replaces (``None``: encode here).
    """

    def __init__(self, merge: int, inner: Callable[..., torch.Tensor] | None = None):
        super().__init__(inner)
        self.merge = merge

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
        missing = _first_unknown(keys, self.features)
        if missing:
            pixels = torch.cat([pixel_values[starts[i] : starts[i] + patches[i]] for i in missing])
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


class FrameCache(_KeyedFeatures):
    """Features of single frames by key (one key per frame), for a tower that encodes each
    image on its own (LLaVA-OneVision's SigLIP). The cached features are the tower's (before
    the projector and pooling). A forward of another image count (e.g. a prompt's images,
    encoded before its video) encodes everything and uses the keys up.

    Args:
        inner: the split hook it replaces (``None``: encode here).
    """

    def _encode(self, encode: Callable, images: torch.Tensor) -> torch.Tensor:
        return encode(images) if self.inner is None else self.inner(encode, images)

    def __call__(self, encode: Callable, images: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
        """``[N, C, S, S]`` frames -> ``[N, L, D]`` features. ``counts`` (frames per video) is not
        passed on: here ``images`` are every frame, which a cp split may take as one run."""
        keys, self.keys = self.keys, None
        if keys is None or len(keys) != images.shape[0]:
            self.encoded += images.shape[0]
            return self._encode(encode, images)
        missing = _first_unknown(keys, self.features)
        if missing:
            features = self._encode(encode, images[missing])
            self.features.update({keys[i]: f for i, f in zip(missing, features)})
            self.encoded += len(missing)
        return torch.stack([self.features[key] for key in keys])


@contextlib.contextmanager
def frame_cache(model: nn.Module) -> Iterator[FrameCache]:
    """Inside, ``model.visual`` (a per-image tower) encodes through a :class:`FrameCache`; the
    previous split hook is back on exit."""
    visual = model.visual
    previous = visual.split
    cache = FrameCache(previous)
    visual.split = cache
    try:
        yield cache
    finally:
        visual.split = previous
