"""Packing instruction-tuning samples into rows: the assignment, the packed item, chat and
video datasets packed.

Oracle of a packed row: its samples' own items (the unpacked dataset), back to back; exact.
"""

import json
import random

import pytest
import torch

from omnilong.data import BadSampleError, chat_dataset, load_tokenizer, video_sft_dataset
from omnilong.data.packing import PackedDataset, concat_documents, pack_rows
from omnilong.testing.tiny_qwen2_5_vl import TINY_MAX_PIXELS, TINY_MIN_PIXELS

TINY = dict(video_min_pixels=TINY_MIN_PIXELS, video_max_pixels=TINY_MAX_PIXELS)


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen_dir):
    return load_tokenizer(tiny_qwen_dir)


def _chats(path, n, seed=0):
    rng = random.Random(seed)
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": " ".join(["word"] * rng.randint(1, 40))},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


# ---------------------------------------------------------------- assignment
def test_best_fit_decreasing_on_a_hand_case():
    # longest first: 6 -> row 0 (room 4), 5 -> row 1 (room 5), 4 -> row 0 (best fit: room 4 exactly),
    # 3 -> row 1 (room 2), 2 -> row 1 (room 0), 1 -> row 2
    assert pack_rows([3, 6, 1, 5, 2, 4], max_seq_len=10) == [[1, 5], [0, 3, 4], [2]]


def test_every_sample_lands_in_exactly_one_row_within_max_seq_len():
    rng = random.Random(1)
    lengths = [rng.randint(1, 100) for _ in range(1000)]
    rows = pack_rows(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(1000))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert all(row == sorted(row) for row in rows)
    assert len(rows) <= 1.05 * sum(lengths) / 128 + 1  # near the fewest rows possible
    assert pack_rows(lengths, 128) == rows  # a function of the lengths alone


def test_a_sample_that_cannot_fit_is_named():
    with pytest.raises(ValueError, match=r"sample 2 has 11 tokens; packing needs 1..max_seq_len=10"):
        pack_rows([3, 4, 11], 10)


def test_an_item_with_an_unknown_key_is_refused():
    with pytest.raises(ValueError, match="cannot pack items holding 'attention_mask'"):
        concat_documents([{"input_ids": torch.ones(2), "attention_mask": torch.ones(2)}])


# ---------------------------------------------------------------- chat
def test_packed_chat_row_is_its_samples_back_to_back(tokenizer, tmp_path):
    data = _chats(tmp_path / "c.jsonl", 40)
    plain = chat_dataset(tokenizer, data, max_seq_len=128, packed=False)
    packed = chat_dataset(tokenizer, data, max_seq_len=128)  # packed by default
    assert isinstance(packed, PackedDataset) and len(packed) < len(plain)
    assert packed.pad_id == plain.pad_id and packed.num_skipped == 0  # read through to the samples
    assert sorted(i for row in packed.rows for i in row) == list(range(len(plain)))
    for index, members in enumerate(packed.rows):
        row, items = packed[index], [plain[i] for i in members]
        assert len(row["input_ids"]) <= 128
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(row[key], torch.cat([item[key] for item in items])), key
        lengths = torch.tensor([len(item["input_ids"]) for item in items])
        assert torch.equal(row["document_ids"], torch.repeat_interleave(torch.arange(len(items)), lengths))
        # each document's last token predicts nothing: no label crosses documents
        assert (row["labels"][lengths.cumsum(0) - 1] == -100).all()


# ---------------------------------------------------------------- video
def _video_data(videos_dir, tmp_path, extra=()):
    lines = (videos_dir / "train.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    for sample in samples:
        sample["video"] = str(videos_dir / sample["video"])
    path = tmp_path / "v.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in [*samples, *extra]))
    return path


def test_video_lengths_from_metadata_are_the_decoded_lengths(tokenizer, tiny_videos_dir, tmp_path):
    """The token counts packing uses (videos' metadata, no frame decoded) equal the items'."""
    ds = video_sft_dataset(tokenizer, _video_data(tiny_videos_dir, tmp_path), max_seq_len=512, **TINY)
    assert ds.sample_lengths() == [len(ds[i]["input_ids"]) for i in range(len(ds))]


def test_packed_video_row_concatenates_tokens_and_vision_in_order(tokenizer, tiny_videos_dir, tmp_path):
    data = _video_data(tiny_videos_dir, tmp_path)
    plain = video_sft_dataset(tokenizer, data, max_seq_len=300, **TINY)
    packed = video_sft_dataset(tokenizer, data, max_seq_len=300, packed=True, **TINY)
    assert packed.video_token_id == plain.video_token_id
    assert len(packed) < len(plain) and max(len(row) for row in packed.rows) > 1
    for index, members in enumerate(packed.rows):
        row, items = packed[index], [plain[i] for i in members]
        for key in ("input_ids", "labels"):
            assert torch.equal(row[key], torch.cat([item[key] for item in items])), key
        for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            assert torch.equal(row[key], torch.cat([item[key] for item in items])), key
        assert row["document_ids"].max() == len(items) - 1 and int(row["skipped"]) == 0


def test_packed_bad_videos_raise_at_construction_or_are_skipped_placeholders(tokenizer, tiny_videos_dir, tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video" * 100)
    bad = {
        "video": str(tmp_path / "corrupt.mp4"),
        "conversations": [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "This."}],
    }
    data = _video_data(tiny_videos_dir, tmp_path, extra=[bad])
    with pytest.raises(BadSampleError, match=r"v\.jsonl:9: .*corrupt\.mp4: cannot decode video"):
        video_sft_dataset(tokenizer, data, max_seq_len=300, packed=True, **TINY)
    ds = video_sft_dataset(tokenizer, data, max_seq_len=300, packed=True, skip_bad_samples=True, **TINY)
    assert ds.samples.sample_lengths()[8] == 3  # planned as its placeholder
    rows = [ds[i] for i in range(len(ds))]
    assert sum(int(row["skipped"]) for row in rows) == 1
    assert sum(len(row["input_ids"]) for row in rows) == sum(ds.samples.sample_lengths())


def test_a_video_whose_frames_disagree_with_its_metadata_is_a_bad_sample(
    tokenizer, tiny_videos_dir, tmp_path, monkeypatch
):
    import omnilong.data.video_sft as video_sft

    real_probe = video_sft.probe_video
    monkeypatch.setattr(video_sft, "probe_video", lambda *a: (lambda f, h, w: (f + 2, h, w))(*real_probe(*a)))
    ds = video_sft_dataset(tokenizer, _video_data(tiny_videos_dir, tmp_path), max_seq_len=512, packed=True, **TINY)
    with pytest.raises(BadSampleError, match=r"tokens once decoded, but its videos' metadata gave \d+"):
        ds[0]
