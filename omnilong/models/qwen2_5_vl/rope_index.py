"""Multimodal RoPE positions (temporal, height, width) of a Qwen2.5-VL token sequence.

A pure function of the token ids and the vision grids, so the data pipeline can call it
on full sequences before they are sharded for context parallelism. It reproduces
transformers' ``Qwen2_5_VLModel.get_rope_index`` (5.x):

- a text run continues one position per token on all three streams from ``pos``
  (starting at 0);
- an image or video of LLM grid ``(t, h, w)`` (patch grid with ``h, w`` divided by the
  spatial merge) starting at ``pos`` gets height ``pos + row``, width ``pos + column`` and
  temporal ``pos + floor(frame * interval)``, ``interval = tokens_per_second *
  second_per_grid_t`` for videos (the product is floored, not the seconds) and 1 for images;
- after it, ``pos`` advances by ``max(h, w)`` only (not past the temporal positions);
- padding tokens (``attention_mask`` 0) are skipped and get position 0.

transformers 4.x, the code Qwen2.5-VL was released with, continued after a vision item
from its largest position on any stream + 1 instead; for videos whose temporal positions
outrun ``max(h, w)`` the two differ, and this module follows the installed 5.x.
"""

from itertools import repeat
from typing import Iterator, Optional, Sequence, Union

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


def _vision_positions(start: int, grid: Sequence[int], merge: int, interval: Union[int, torch.Tensor]) -> torch.Tensor:
    """``[3, t * h * w]`` positions of one vision item, in token order (t, then h, then w)."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    temporal = (torch.arange(t) * interval).long() + start
    rows, cols = torch.arange(h) + start, torch.arange(w) + start
    return torch.stack(torch.meshgrid(temporal, rows, cols, indexing="ij")).reshape(3, -1)


def _row_positions(
    types: torch.Tensor, grids: dict[int, Iterator], seconds: Iterator, merge: int, tokens_per_second: int
) -> torch.Tensor:
    """``[3, L]`` positions of one unpadded row of token types (text 0, image 1, video 2).

    A run of vision tokens may hold several items of its kind back to back; each takes
    the next grid (and, for videos, the next ``second_per_grid_t``) in order.
    """
    kinds, counts = torch.unique_consecutive(types, return_counts=True)
    pos, chunks = 0, []
    for kind, count in zip(kinds.tolist(), counts.tolist()):
        if kind == TEXT:
            chunks.append(torch.arange(pos, pos + count).expand(3, -1))
            pos += count
            continue
        while count > 0:
            grid = next(grids[kind], None)
            if grid is None:
                raise ValueError(f"more {'image' if kind == IMAGE else 'video'} tokens than grids describe")
            grid = grid.tolist()
            interval = tokens_per_second * next(seconds) if kind == VIDEO else 1
            chunks.append(_vision_positions(pos, grid, merge, interval))
            pos += max(grid[1], grid[2]) // merge
            count -= grid[0] * (grid[1] // merge) * (grid[2] // merge)
        if count < 0:
            raise ValueError("a run of vision pad tokens is shorter than its grid's token count")
    return torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)


def rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: Optional[torch.Tensor] = None,
    video_grid_thw: Optional[torch.Tensor] = None,
    second_per_grid_ts: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int = 2,
    tokens_per_second: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions of token rows holding any mix of text, images and videos.

    Args:
        input_ids: ``[B, T]`` token ids; each image/video is a run of its pad token of
            length ``t * h * w / merge^2``.
        image_grid_thw: ``[n_images, 3]`` patch grids of the images, in order over the batch.
        video_grid_thw: ``[n_videos, 3]`` patch grids of the videos, in order over the batch.
        second_per_grid_ts: ``[n_videos]`` seconds per frame pair (``temporal_patch_size /
            fps``); default 1 for every video.
        attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding.
        image_token_id, video_token_id: the pad token ids (from the config).
        spatial_merge_size: side of a merge group in patches.
        tokens_per_second: temporal positions per second of video.

    Returns:
        ``(position_ids, deltas)``: ``position_ids [3, B, T]`` of ``input_ids``' dtype and
        ``deltas [B, 1]``, ``max position + 1 - real token count`` per row.

    Raises:
        ValueError: the pad tokens and the grids do not describe the same items.
    """
    types = (input_ids == image_token_id).long() * IMAGE + (input_ids == video_token_id).long() * VIDEO
    grids = {kind: iter(g.cpu() if g is not None else ())
             for kind, g in ((IMAGE, image_grid_thw), (VIDEO, video_grid_thw))}
    seconds = iter(torch.as_tensor(second_per_grid_ts).cpu()) if second_per_grid_ts is not None else repeat(1)
    position_ids = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype)
    deltas = []
    for b in range(input_ids.shape[0]):
        real = (attention_mask[b].bool().cpu() if attention_mask is not None
                else torch.ones(input_ids.shape[1], dtype=torch.bool))
        positions = _row_positions(types[b].cpu()[real], grids, seconds, spatial_merge_size, tokens_per_second)
        position_ids[:, b, real] = positions.to(position_ids.dtype)
        deltas.append(int(positions.max()) + 1 - int(real.sum()) if positions.numel() else 0)
    leftover = [name for name, kind in (("image", IMAGE), ("video", VIDEO)) if next(grids[kind], None) is not None]
    if leftover:
        raise ValueError(f"more {' and '.join(leftover)} grids than pad-token runs describe")
    return position_ids.to(input_ids.device), torch.tensor(deltas, device=input_ids.device).unsqueeze(1)
