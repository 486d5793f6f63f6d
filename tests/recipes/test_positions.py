"""The recipe's M-RoPE positions: the model's rule, computed once on the full collated batch
(before any context-parallel cut), not by the data pipeline; per document in packed rows.

Oracle: :func:`rope_index` of each sample alone (the served rule, checked on hand-computed
cases in tests/models/qwen2_5_vl/test_rope_index.py); right padding is a document of its
own, counted from 0 on every stream; exact equality. A packed row through the tiny model
(fp32): each document's logits are those of its sample alone within 1e-5.
"""

import json

import pytest
import torch

from omnilong.data import chat_dataset, collate_padded, load_tokenizer, video_sft_dataset
from omnilong.models import load_hf_model
from omnilong.models.qwen2_5_vl import rope_index
from omnilong.testing.tiny_qwen2_5_vl import TINY_MAX_PIXELS, TINY_MIN_PIXELS


def _alone(ds, item):
    """``[3, T]`` positions of one sample by itself."""
    positions, _ = rope_index(
        item["input_ids"][None],
        video_grid_thw=item["video_grid_thw"],
        second_per_grid_ts=item["second_per_grid_ts"],
        image_token_id=ds.image_token_id,
        video_token_id=ds.video_token_id,
        tokens_per_second=2,
    )
    return positions[:, 0]


def test_video_batch_gets_the_positions_of_each_full_row(tiny_qwen_dir, tiny_videos_dir):
    model = load_hf_model(tiny_qwen_dir)
    ds = video_sft_dataset(
        load_tokenizer(tiny_qwen_dir),
        tiny_videos_dir / "train.jsonl",
        max_seq_len=512,
        video_min_pixels=TINY_MIN_PIXELS,
        video_max_pixels=TINY_MAX_PIXELS,
    )
    first = ds[0]
    second = next(ds[i] for i in range(1, len(ds)) if len(ds[i]["input_ids"]) != len(first["input_ids"]))
    items = [first, second]
    batch = model.with_positions(collate_padded(items, ds.pad_id))
    length = batch["input_ids"].shape[1]
    assert batch["position_ids"].shape == (3, 2, length)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["position_ids"][:, row, :n], _alone(ds, item))
        assert torch.equal(batch["position_ids"][:, row, n:], torch.arange(length - n).expand(3, -1))


def test_batches_with_positions_or_without_vision_pass_unchanged(tiny_qwen_dir):
    model = load_hf_model(tiny_qwen_dir)
    text = {"input_ids": torch.tensor([[5, 6, 7]]), "position_ids": torch.tensor([[0, 1, 0]])}
    assert model.with_positions(text) is text
    assert model.with_positions({"input_ids": text["input_ids"]}).keys() == {"input_ids"}


@pytest.fixture(scope="module")
def packed_videos(tiny_qwen_dir, tiny_videos_dir):
    """The demo videos unpacked and packed in rows of 300 tokens."""
    tokenizer = load_tokenizer(tiny_qwen_dir)
    kw = dict(max_seq_len=300, video_min_pixels=TINY_MIN_PIXELS, video_max_pixels=TINY_MAX_PIXELS)
    data = tiny_videos_dir / "train.jsonl"
    return video_sft_dataset(tokenizer, data, **kw), video_sft_dataset(tokenizer, data, packed=True, **kw)


def test_packed_rows_get_each_samples_positions_alone(tiny_qwen_dir, packed_videos):
    model = load_hf_model(tiny_qwen_dir)
    plain, packed = packed_videos
    batch = model.with_positions(collate_padded([packed[0], packed[1]], packed.pad_id))
    for row, members in enumerate(packed.rows[:2]):
        expected = torch.cat([_alone(plain, plain[i]) for i in members], dim=1)
        n = expected.shape[1]
        assert torch.equal(batch["position_ids"][:, row, :n], expected)
        assert (batch["document_ids"][row, n:] == -1).all()


def _logits(model, batch, dataset):
    """The model's logits of ``batch``, its uint8 video pixels normalised as the recipe does."""
    batch = {k: v for k, v in batch.items() if k not in ("labels", "skipped")}
    batch = getattr(dataset, "normalize_pixels", lambda b: b)(batch)
    with torch.no_grad():
        return model(**batch)[0]  # [T, vocab]


def test_a_packed_row_gives_each_document_the_logits_of_its_sample_alone(tiny_qwen_dir, tmp_path, packed_videos):
    """Video rows (M-RoPE positions per document, vision features in order) and chat rows
    (text positions per document): the documents never see each other."""
    model = load_hf_model(tiny_qwen_dir)
    chats = tmp_path / "c.jsonl"
    chats.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"q{i} " * (i + 1)},
                        {"role": "assistant", "content": "a " * (9 - i)},
                    ]
                }
            )
            + "\n"
            for i in range(6)
        )
    )
    tokenizer = load_tokenizer(tiny_qwen_dir)
    for plain, packed in (
        packed_videos,
        (chat_dataset(tokenizer, chats, 128, packed=False), chat_dataset(tokenizer, chats, 128)),
    ):
        members = max(packed.rows, key=len)
        assert len(members) > 1
        row = _logits(model, model.with_positions(collate_padded([packed[packed.rows.index(members)]], 0)), packed)
        start = 0
        for i in members:
            alone = _logits(model, model.with_positions(collate_padded([plain[i]], 0)), plain)
            assert (row[start : start + len(alone)] - alone).abs().max() <= 1e-5
            start += len(alone)
