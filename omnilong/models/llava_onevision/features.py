"""From projected SigLIP features to the rows that replace ``<image>`` / ``<video>`` tokens.

Images (``anyres_max_N``): the processor gives a base 384x384 crop of the whole image and a
grid of 384x384 crops of the image resized into its best pinpoint resolution. The grid's
features are laid out as one feature map, the padding the resize added is cut away
(unpadding), the map is bilinearly downscaled when it holds more than ``N`` crops' worth of
features, and a newline feature ends each of its rows; the base crop's features come first.

Videos: each frame's ``grid x grid`` map is bilinearly resized to ``ceil(grid / 2)`` per side
(27 -> 14), frames follow each other, one newline feature ends the video.
"""

import math

import torch
import torch.nn.functional as F


def best_resolution(image_size: list[int], pinpoints: list[list[int]]) -> tuple[int, int]:
    """The pinpoint ``(height, width)`` an image of ``(height, width)`` is resized into: the one
    keeping the most of its pixels once fitted inside (aspect kept), ties to the least waste."""
    height, width = image_size
    best, best_key = None, None
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(w * h - effective))
        if best_key is None or key > best_key:
            best, best_key = (h, w), key
    return best


def num_crops(image_size: list[int], pinpoints: list[list[int]], crop: int) -> int:
    """Crops of one ``anyres`` image: its base crop plus the grid of its best resolution."""
    height, width = best_resolution(image_size, pinpoints)
    return 1 + math.ceil(height / crop) * math.ceil(width / crop)


def unpad(features: torch.Tensor, image_size: list[int]) -> torch.Tensor:
    """Cut from ``features [dim, H, W]`` the rows or columns that the aspect-preserving resize of
    an image of ``(height, width)`` padded (equally on both sides)."""
    height, width = image_size
    current_h, current_w = features.shape[1:]
    if width / height > current_w / current_h:
        new_h = int(round(height * (current_w / width), 7))
        pad = (current_h - new_h) // 2
        return features[:, pad : current_h - pad, :]
    new_w = int(round(width * (current_h / height), 7))
    pad = (current_w - new_w) // 2
    return features[:, :, pad : current_w - pad]


def pack_image_features(
    features: torch.Tensor,
    image_size: list[int],
    newline: torch.Tensor,
    pinpoints: list[list[int]],
    crop: int,
    max_crops: int,
) -> torch.Tensor:
    """The token rows of one image.

    Args:
        features: ``[n_crops, grid^2, dim]`` projected features, base crop first.
        image_size: the original ``(height, width)``.
        newline: ``[dim]`` the ``image_newline`` parameter.
        pinpoints: the grid resolutions (``image_grid_pinpoints``).
        crop: the crop side in pixels (the tower's ``image_size``).
        max_crops: ``N`` of ``anyres_max_N``.

    Returns:
        ``[grid^2 + H' * (W' + 1), dim]`` (one crop only: ``[grid^2 + 1, dim]``, the base and a newline).
    """
    dim = features.shape[-1]
    if features.shape[0] == 1:
        return torch.cat([features[0], newline[None].to(features.dtype)])
    grid = math.isqrt(features.shape[1])
    best_h, best_w = best_resolution(image_size, pinpoints)
    rows, cols = best_h // crop, best_w // crop
    fmap = features[1:].view(rows, cols, grid, grid, dim).permute(4, 0, 2, 1, 3)  # [dim, rows, grid, cols, grid]
    fmap = unpad(fmap.reshape(dim, rows * grid, cols * grid), image_size)  # [dim, H, W]
    height, width = fmap.shape[1:]
    ratio = math.sqrt(height * width / (max_crops * grid**2))
    if ratio > 1.1:
        fmap = F.interpolate(fmap[None], [int(height // ratio), int(width // ratio)], mode="bilinear")[0]
    column = newline.to(fmap.dtype)[:, None, None].expand(dim, fmap.shape[1], 1)
    fmap = torch.cat([fmap, column], dim=-1)  # [dim, H', W' + 1]
    return torch.cat([features[0], fmap.flatten(1).transpose(0, 1)])


def pool_video_features(features: torch.Tensor, grid: int) -> torch.Tensor:
    """``[frames, grid^2, dim]`` -> ``[frames, ceil(grid / 2)^2, dim]``: each frame's feature
    map bilinearly resized (``align_corners=False``, as transformers does)."""
    frames, _, dim = features.shape
    fmap = features.view(frames, grid, grid, dim).permute(0, 3, 1, 2)  # [frames, dim, grid, grid]
    side = math.ceil(grid / 2)
    fmap = F.interpolate(fmap, size=[side, side], mode="bilinear")
    return fmap.permute(0, 2, 3, 1).reshape(frames, side * side, dim)
