"""M-RoPE positions by the rule Qwen2.5-VL was trained and is served with.

Oracle: position lists worked out by hand from the rule (transformers 4.49-4.57
``get_rope_index``, vLLM ``get_mrope_input_positions``): a vision item starting at ``s``
takes t = s + floor(i * second_per_grid_t * tokens_per_second) for frame group i (images:
i = 0), h = s + row, w = s + column; the text after it resumes at the item's largest
position on any stream + 1. Spatial merge 2, 2 tokens per second; exact equality.
"""

import pytest
import torch

from omnilong.models.qwen2_5_vl import rope_index

IMG, VID, PAD = 101, 102, 0
x = 7  # any text token (vision start/end tokens are text here)


def positions(rows, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None, attention_mask=None, **kwargs):
    """``(t, h, w, deltas)`` lists of ``rope_index`` on the token rows ``rows``."""
    as_tensor = lambda v: None if v is None else torch.tensor(v)  # noqa: E731
    position_ids, deltas = rope_index(
        torch.tensor(rows),
        as_tensor(image_grid_thw),
        as_tensor(video_grid_thw),
        as_tensor(second_per_grid_ts),
        as_tensor(attention_mask),
        image_token_id=IMG,
        video_token_id=VID,
        spatial_merge_size=2,
        tokens_per_second=2,
        **kwargs,
    )
    return (*position_ids.tolist(), deltas.flatten().tolist())


def test_text_after_a_long_video_resumes_past_its_last_frame():
    """Grid (3, 4, 2) -> 3 frame groups of 2x1 tokens, 2 s each (4 positions apart), from 2.
    transformers 5.x would resume the text at 2 + max(2, 1) = 4, inside the video's time."""
    t, h, w, deltas = positions([[x, x] + [VID] * 6 + [x, x]], video_grid_thw=[[3, 4, 2]], second_per_grid_ts=[2.0])
    assert t == [[0, 1, 2, 2, 6, 6, 10, 10, 11, 12]]
    assert h == [[0, 1, 2, 3, 2, 3, 2, 3, 11, 12]]
    assert w == [[0, 1, 2, 2, 2, 2, 2, 2, 11, 12]]
    assert deltas == [12 + 1 - 10]


def test_two_videos_back_to_back():
    """Pad runs of two videos touch; the second starts at the first's max + 1."""
    t, h, w, deltas = positions(
        [[x] + [VID] * 2 + [VID] * 4 + [x]], video_grid_thw=[[2, 2, 2], [2, 2, 4]], second_per_grid_ts=[1.0, 0.5]
    )
    assert t == [[0, 1, 3, 4, 4, 5, 5, 6]]
    assert h == [[0, 1, 1, 4, 4, 4, 4, 6]]
    assert w == [[0, 1, 1, 4, 5, 4, 5, 6]]
    assert deltas == [6 + 1 - 8]


def test_an_image_has_one_temporal_position_and_a_2d_grid():
    t, h, w, deltas = positions([[x, x] + [IMG] * 6 + [x]], image_grid_thw=[[1, 4, 6]])
    assert t == [[0, 1, 2, 2, 2, 2, 2, 2, 5]]
    assert h == [[0, 1, 2, 2, 2, 3, 3, 3, 5]]
    assert w == [[0, 1, 2, 3, 4, 2, 3, 4, 5]]
    assert deltas == [5 + 1 - 9]


def test_fractional_seconds_floor_the_product_not_the_seconds():
    """0.7 s x 2 tokens/s: frame groups at floor(0, 1.4, 2.8, 4.2) = 0, 1, 2, 4;
    0.25 s: floor(0, 0.5, 1, 1.5) = 0, 0, 1, 1."""
    row = [x] + [VID] * 4 + [x] + [VID] * 4 + [x]
    t, h, w, deltas = positions([row], video_grid_thw=[[4, 2, 2], [4, 2, 2]], second_per_grid_ts=[0.7, 0.25])
    assert t == [[0, 1, 2, 3, 5, 6, 7, 7, 8, 8, 9]]
    assert h == w == [[0, 1, 1, 1, 1, 6, 7, 7, 7, 7, 9]]
    assert deltas == [9 + 1 - 11]


def test_left_padding_is_skipped_and_gets_position_zero():
    t, h, w, deltas = positions(
        [[PAD, PAD, x, VID, VID, x]],
        video_grid_thw=[[2, 2, 2]],
        second_per_grid_ts=[2.0],
        attention_mask=[[0, 0, 1, 1, 1, 1]],
    )
    assert t == [[0, 0, 0, 1, 5, 6]]
    assert h == w == [[0, 0, 0, 1, 1, 6]]
    assert deltas == [6 + 1 - 4]


@pytest.mark.parametrize("with_types", [False, True])
def test_batch_rows_with_different_layouts(with_types):
    """Row 0: an image; row 1: a video. Grids are listed in batch order per kind; the
    processor's mm_token_type_ids, when given, place the same items."""
    rows = [[x, IMG, IMG, x, x], [x, VID, VID, VID, x]]
    types = {"mm_token_type_ids": (torch.tensor(rows) == IMG).int() + 2 * (torch.tensor(rows) == VID).int()}
    t, h, w, deltas = positions(
        rows,
        image_grid_thw=[[1, 2, 4]],
        video_grid_thw=[[3, 2, 2]],
        second_per_grid_ts=[1.0],
        **(types if with_types else {}),
    )
    assert t == [[0, 1, 1, 3, 4], [0, 1, 3, 5, 6]]
    assert h == [[0, 1, 1, 3, 4], [0, 1, 1, 1, 6]]
    assert w == [[0, 1, 2, 3, 4], [0, 1, 1, 1, 6]]
    assert deltas == [4 + 1 - 5, 6 + 1 - 5]


def test_videos_default_to_one_second_per_frame_group():
    t, _, _, _ = positions([[VID, VID, x]], video_grid_thw=[[2, 2, 2]])
    assert t == [[0, 2, 3]]


def test_grids_and_pad_tokens_that_disagree_are_errors():
    with pytest.raises(ValueError, match="more video tokens than grids"):
        positions([[x, VID, VID, x]], video_grid_thw=[[1, 2, 2]])
    with pytest.raises(ValueError, match="more image grids than pad-token runs"):
        positions([[x, IMG, x]], image_grid_thw=[[1, 2, 2], [1, 2, 2]])
