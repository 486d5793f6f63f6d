"""Under context parallelism a video dataset decodes only a cp rank's share of each video.

Oracle: the same dataset without a cp share (every frame decoded and processed, the items as
they were before shares existed). A rank's item must have the whole sample's token row, grids
and frame counts, and exactly (bitwise) the oracle's pixel rows of the frame units that the
towers' split rule (:func:`omnilong.vision_shares.unit_share`) gives the rank; the ranks' pixels
together are the oracle's.
"""

import json
from pathlib import Path

import pytest
import torch

from omnilong.vision_shares import frame_share, unit_share
from tests.cp_share_datasets import llava_dataset, qwen_dataset

FRAMES = 31  # cp_share_videos' long video: 16 frame pairs, 4 per rank at cp 4


def _shared(dataset, rank: int, cp: int):
    dataset.decode_cp_share(rank, cp)
    return dataset


def _share_rows(pixels: torch.Tensor, units: list[int], rows_per_unit: list[int], rank: int, cp: int) -> torch.Tensor:
    """The rows of ``pixels`` (videos back to back, ``units[v]`` units of ``rows_per_unit[v]``
    rows each) of rank ``rank``'s units of every video."""
    out, offset = [], 0
    for n, rows in zip(units, rows_per_unit):
        lo, hi = unit_share(n, rank, cp)
        out.append(pixels[offset + lo * rows : offset + hi * rows])
        offset += n * rows
    return torch.cat(out)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("index", [0, 1])
def test_qwen_rank_decodes_only_its_frame_pairs_with_the_whole_token_row(tiny_qwen_dir, cp_share_videos, cp, index):
    """Each rank: the oracle's tokens, labels, grids and seconds per pair; pixels of its frame
    pairs bitwise; the ranks' rows cover the oracle's once (the 5-frame video has 3 pairs, so at
    cp 4 some rank has none of it)."""
    full = qwen_dataset(tiny_qwen_dir, cp_share_videos)[index]
    grids = full["video_grid_thw"].tolist()
    units, rows = [t for t, _, _ in grids], [h * w for _, h, w in grids]
    assert index == 1 or units[0] // cp >= 4 or cp == 2  # the long video gives every rank several pairs
    covered = 0
    for rank in range(cp):
        item = _shared(qwen_dataset(tiny_qwen_dir, cp_share_videos), rank, cp)[index]
        for key in ("input_ids", "labels", "document_ids", "video_grid_thw", "second_per_grid_ts", "skipped"):
            assert torch.equal(item[key], full[key]), key
        assert torch.equal(item["pixel_values_videos"], _share_rows(full["pixel_values_videos"], units, rows, rank, cp))
        assert torch.equal(item["decode_failures"], torch.zeros_like(item["input_ids"]))
        covered += item["pixel_values_videos"].shape[0]
    assert covered == full["pixel_values_videos"].shape[0]


@pytest.mark.parametrize("cp", [2, 4])
def test_llava_rank_decodes_only_its_frames_with_the_whole_token_row(tiny_llava_dir, cp_share_videos, cp):
    full = llava_dataset(tiny_llava_dir, cp_share_videos)
    for index in range(len(full)):
        expected = full[index]
        frames = expected["video_num_frames"].tolist()
        for rank in range(cp):
            item = _shared(llava_dataset(tiny_llava_dir, cp_share_videos), rank, cp)[index]
            for key in ("input_ids", "labels", "video_num_frames", "skipped"):
                assert torch.equal(item[key], expected[key]), key
            share = _share_rows(expected["pixel_values_videos"], frames, [1] * len(frames), rank, cp)
            assert torch.equal(item["pixel_values_videos"], share)


def test_frame_share_covers_whole_units_and_completes_an_odd_last_pair():
    """Frames of a rank are its units' frames: pairs start at even frames, the last pair of 31
    frames is frame 30 alone (processing repeats it), and the ranks tile the frames in order."""
    shares = [frame_share(FRAMES, 2, rank, 4) for rank in range(4)]
    assert shares == [(0, 8), (8, 16), (16, 24), (24, 31)]
    assert [frame_share(5, 2, rank, 4) for rank in range(4)] == [(0, 0), (0, 2), (2, 4), (4, 5)]
    assert [unit_share(3, rank, 4) for rank in range(4)] == [(0, 0), (0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="outside 0..3"):
        unit_share(3, 4, 4)


def _one_sample(path: Path, video: Path, template: Path) -> Path:
    """A ``train.jsonl`` of the first conversation of ``template`` over ``video``."""
    sample = {"video": str(video), "conversations": json.loads(template.read_text().splitlines()[0])["conversations"]}
    path.write_text(json.dumps(sample) + "\n")
    return path


def test_a_rank_that_cannot_decode_its_frames_flags_the_sample(tiny_qwen_dir, cp_share_videos, tmp_path):
    """A video whose metadata reads but whose last frames do not decode: without cp the sample is
    bad (as always); at cp 2 only rank 1 decodes the bad frames. Rank 0's item is as usual (its
    pixels those of the intact video); rank 1's keeps the sample's token row and pixel shape and
    flags every token with 1 + the sample's index, for the recipe's agreement over the cp group.
    Nothing raises in a rank's worker, whatever ``skip_bad_samples`` says."""
    from omnilong.data import BadSampleError

    data = _one_sample(tmp_path / "corrupt.jsonl", cp_share_videos.parent / "corrupt_tail.mp4", cp_share_videos)
    with pytest.raises(BadSampleError, match="corrupt_tail.mp4"):
        qwen_dataset(tiny_qwen_dir, data)[0]
    intact = qwen_dataset(tiny_qwen_dir, cp_share_videos)[0]  # the same video before its tail was zeroed
    _, h, w = intact["video_grid_thw"][0].tolist()
    first = 8 * h * w  # rows of frame pairs 0-7 (frames 0-15): rank 0's at cp 2
    good, bad = (_shared(qwen_dataset(tiny_qwen_dir, data), rank, 2)[0] for rank in (0, 1))
    assert not good["decode_failures"].any()
    assert torch.equal(good["pixel_values_videos"], intact["pixel_values_videos"][:first])
    assert torch.equal(bad["decode_failures"], torch.ones_like(intact["input_ids"]))
    for key in ("input_ids", "labels", "video_grid_thw"):
        assert torch.equal(bad[key], intact[key]), key
    assert bad["pixel_values_videos"].shape == intact["pixel_values_videos"][first:].shape


@pytest.mark.parametrize("skip", [True, False])
def test_an_unreadable_video_is_bad_on_every_rank_alike(tiny_qwen_dir, cp_share_videos, tmp_path, skip):
    """An unreadable file is seen in the metadata that every rank reads: each rank gives the
    skipped placeholder (its one blank frame pair on the last rank only) or raises naming it."""
    from omnilong.data import BadSampleError

    (tmp_path / "broken.mp4").write_bytes(b"\x00\x01 not a video" * 64)
    broken = _one_sample(tmp_path / "broken.jsonl", tmp_path / "broken.mp4", cp_share_videos)
    for rank in range(2):
        dataset = _shared(qwen_dataset(tiny_qwen_dir, broken, skip_bad_samples=skip), rank, 2)
        if not skip:
            with pytest.raises(BadSampleError, match="broken.mp4"):
                dataset[0]
            continue
        item = dataset[0]
        assert bool(item["skipped"]) and not item["decode_failures"].any()
        assert item["pixel_values_videos"].shape[0] == (4 if rank == 1 else 0)
