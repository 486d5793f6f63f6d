"""Multimodal RoPE positions (temporal, height, width) of a Qwen2.5-VL token sequence.

The rule Qwen2.5-VL was trained with and is served with (the "served rule"): that of
transformers 4.49-4.57 ``Qwen2_5_VLModel.get_rope_index`` ("text start position_ids as the
max vision position_ids plus 1"), vLLM's ``Qwen2_5_VLForConditionalGeneration.
get_mrope_input_positions`` (``vllm/model_executor/models/qwen2_5_vl.py``), Qwen's own
fine-tuning code (``qwen-vl-finetune/qwenvl/data/rope2d.py``) and verl:

- a text run continues one position per token on all three streams from ``pos``
  (starting at 0);
- an image or video of LLM grid ``(t, h, w)`` (its patch grid with ``h, w`` divided by the
  spatial merge) starting at ``pos`` gets height ``pos + row``, width ``pos + column`` and
  temporal ``pos + floor(i * second_per_grid_t * tokens_per_second)`` for frame group ``i``
  (the product is floored, in float32 left to right as vLLM computes it, so fractional
  seconds count); an image has ``i = 0`` only;
- the text after an item resumes at the item's largest position on any stream + 1;
- padding tokens (``attention_mask`` 0) are skipped and get position 0.

One detail differs among the references: transformers 4.x casts ``second_per_grid_t`` to
an integer before the product (so 0.5 s per frame group, e.g. 4 fps, becomes 0), while
vLLM and ``rope2d.py`` keep fractional seconds; this module follows vLLM and ``rope2d.py``.

transformers >= 5.3 resumes at ``pos + max(h, w)`` instead, not past the temporal
positions: for a video whose temporal positions outrun its spatial size (any long video)
the text after it then lands inside the video's temporal range, which the released model
never saw in training and vLLM never gives it. Do not follow it; parity tests against
transformers 5.x pass these positions explicitly.
"""

from collections.abc import Iterator, Sequence
from itertools import repeat

import torch

from omnilong.models.varlen_attention import runs_of_equal_ids

TEXT, IMAGE, VIDEO = 0, 1, 2

#: The rule above, named where a user can see which one a checkpoint was trained with.
POSITION_RULE = (
    "qwen2.5-vl served rule: text after an image/video resumes at the item's largest position on any of the "
    "three M-RoPE streams + 1; video frame group i sits at start + floor(i * second_per_grid_t * "
    "tokens_per_second). As transformers 4.49-4.57 get_rope_index, vLLM get_mrope_input_positions and Qwen's "
    "rope2d.py; not transformers >= 5.3 (which resumes at start + max(h, w))"
)


def vision_item_positions(
    start: int, grid: Sequence[int], merge: int, second_per_grid_t: float, tokens_per_second: int
) -> torch.Tensor:
    """``[3, t * h * w]`` positions of one image or video starting at ``start``, in token
    order (frame group, then row, then column of the merged grid).

    Args:
        start: the position the item starts at.
        grid: ``(t, H, W)`` patch grid (``H, W`` before the spatial merge).
        merge: spatial merge size.
        second_per_grid_t: seconds per frame group (0 for an image).
        tokens_per_second: temporal positions per second of video.
    """
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    temporal = (torch.arange(t) * second_per_grid_t * tokens_per_second).long() + start  # [t], floored
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
            second = float(next(seconds)) if kind == VIDEO else 0.0
            chunks.append(vision_item_positions(pos, grid, merge, second, tokens_per_second))
            pos = int(chunks[-1].max()) + 1
            count -= grid[0] * (grid[1] // merge) * (grid[2] // merge)
        if count < 0:
            raise ValueError("a run of vision pad tokens is shorter than its grid's token count")
    return torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)


def rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    image_token_id: int | None,
    video_token_id: int | None,
    spatial_merge_size: int = 2,
    tokens_per_second: int = 2,
    mm_token_type_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions of token rows holding any mix of text, images and videos, by the
    served rule (module docstring).

    Args:
        input_ids: ``[B, T]`` token ids; each image/video is a run of its pad token of
            length ``t * H * W / merge^2``.
        image_grid_thw: ``[n_images, 3]`` patch grids of the images, in order over the batch.
        video_grid_thw: ``[n_videos, 3]`` patch grids of the videos, in order over the batch.
        second_per_grid_ts: ``[n_videos]`` seconds per frame group (``temporal_patch_size /
            fps``); default 1 for every video.
        attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding.
        image_token_id, video_token_id: the pad token ids (from the config).
        spatial_merge_size: side of a merge group in patches.
        tokens_per_second: temporal positions per second of video.
        mm_token_type_ids: ``[B, T]`` token types as the transformers processor returns
            them (text 0, image 1, video 2); default: read from the pad token ids.

    Returns:
        ``(position_ids, deltas)``: ``position_ids [3, B, T]`` of ``input_ids``' dtype and
        ``deltas [B, 1]``, ``max position + 1 - real token count`` per row: the token after
        the row's last real token, whose index among real tokens is that count, takes
        position ``index + delta`` on every stream (as transformers' and vLLM's decoding does).

    Raises:
        ValueError: the pad tokens and the grids do not describe the same items.
    """
    if mm_token_type_ids is not None:
        types = mm_token_type_ids.long()
    else:
        types = torch.zeros_like(input_ids, dtype=torch.long)
        for kind, token_id in ((IMAGE, image_token_id), (VIDEO, video_token_id)):
            if token_id is not None:
                types[input_ids == token_id] = kind
    grids = {
        kind: iter(g.cpu() if g is not None else ()) for kind, g in ((IMAGE, image_grid_thw), (VIDEO, video_grid_thw))
    }
    seconds = iter(torch.as_tensor(second_per_grid_ts).cpu()) if second_per_grid_ts is not None else repeat(1.0)
    position_ids = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype)
    deltas = []
    for b in range(input_ids.shape[0]):
        real = (
            attention_mask[b].bool().cpu()
            if attention_mask is not None
            else torch.ones(input_ids.shape[1], dtype=torch.bool)
        )
        positions = _row_positions(types[b].cpu()[real], grids, seconds, spatial_merge_size, tokens_per_second)
        position_ids[:, b, real] = positions.to(position_ids.dtype)
        deltas.append(int(positions.max()) + 1 - int(real.sum()) if positions.numel() else 0)
    leftover = [name for name, kind in (("image", IMAGE), ("video", VIDEO)) if next(grids[kind], None) is not None]
    if leftover:
        raise ValueError(f"more {' and '.join(leftover)} grids than pad-token runs describe")
    return position_ids.to(input_ids.device), torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def rope_index_per_document(
    document_ids: torch.Tensor,
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    mm_token_type_ids: torch.Tensor | None = None,
    **rule,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_index` of packed rows: each document gets the positions it has alone.

    Every run of equal ``document_ids`` in a row is one document (padding's -1 too, so its
    positions count from 0, as :func:`~omnilong.parallel.sequence_sharding.pad_batch` pads);
    the documents are laid out one per row, in order, so the grids (given in token order over
    the batch) pair with them as they do with whole rows, then their positions are put back.

    Args:
        document_ids: ``[B, T]`` document id per token; documents are contiguous runs.
        input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask,
            mm_token_type_ids: as :func:`rope_index`'s, over the packed rows.
        rule: the keyword arguments of :func:`rope_index` naming the token ids and the rule.

    Returns:
        ``(position_ids [3, B, T], deltas [n_documents, 1])``: the deltas of the documents in
        order (row after row).
    """
    segments = [
        (b, start, end) for b, row in enumerate(document_ids.tolist()) for _, start, end in runs_of_equal_ids(row)
    ]
    longest = max(end - start for _, start, end in segments)
    shape = (len(segments), longest)
    documents = input_ids.new_zeros(shape)
    real = torch.zeros(shape, dtype=torch.bool, device=input_ids.device)
    types = None if mm_token_type_ids is None else mm_token_type_ids.new_zeros(shape)
    for i, (b, start, end) in enumerate(segments):
        documents[i, : end - start] = input_ids[b, start:end]
        real[i, : end - start] = True if attention_mask is None else attention_mask[b, start:end].bool()
        if types is not None:
            types[i, : end - start] = mm_token_type_ids[b, start:end]
    positions, deltas = rope_index(
        documents, image_grid_thw, video_grid_thw, second_per_grid_ts, real, mm_token_type_ids=types, **rule
    )  # [3, n_documents, longest]
    position_ids = torch.zeros(3, *input_ids.shape, dtype=positions.dtype, device=positions.device)
    for i, (b, start, end) in enumerate(segments):
        position_ids[:, b, start:end] = positions[:, i, : end - start]
    return position_ids, deltas
