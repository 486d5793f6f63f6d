"""The recipe's M-RoPE positions: the model's rule, computed once on the full collated batch
(before any context-parallel cut), not by the data pipeline.

Oracle: :func:`rope_index` of each sample alone (the served rule, checked on hand-computed
cases in tests/models/qwen2_5_vl/test_rope_index.py), its right padding continuing one
position per token on every stream; exact equality.
"""

import torch
from omnilong_full import with_mrope_positions

from omnilong.data import collate_padded, load_tokenizer, video_sft_dataset
from omnilong.models import load_hf_model
from omnilong.models.qwen2_5_vl import rope_index
from omnilong.models.qwen2_5_vl.tiny_checkpoint import TINY_MAX_PIXELS, TINY_MIN_PIXELS


def test_video_batch_gets_the_positions_of_each_full_row(tiny_qwen_dir, tiny_videos_dir):
    model = load_hf_model(tiny_qwen_dir)
    ds = video_sft_dataset(load_tokenizer(tiny_qwen_dir), tiny_videos_dir / "train.jsonl", max_seq_len=512,
                           video_min_pixels=TINY_MIN_PIXELS, video_max_pixels=TINY_MAX_PIXELS)
    first = ds[0]
    second = next(ds[i] for i in range(1, len(ds)) if len(ds[i]["input_ids"]) != len(first["input_ids"]))
    items = [first, second]
    batch = with_mrope_positions(collate_padded(items, ds.pad_id), model)
    length = batch["input_ids"].shape[1]
    assert batch["position_ids"].shape == (3, 2, length)
    for row, item in enumerate(items):
        alone, _ = rope_index(item["input_ids"][None], video_grid_thw=item["video_grid_thw"],
                              second_per_grid_ts=item["second_per_grid_ts"], image_token_id=ds.image_token_id,
                              video_token_id=ds.video_token_id, tokens_per_second=2)
        n = len(item["input_ids"])
        assert torch.equal(batch["position_ids"][:, row, :n], alone[:, 0])
        assert torch.equal(batch["position_ids"][:, row, n:], alone[:, 0, -1:] + 1 + torch.arange(length - n))


def test_batches_with_positions_or_without_vision_pass_unchanged(tiny_qwen_dir):
    model = load_hf_model(tiny_qwen_dir)
    text = {"input_ids": torch.tensor([[5, 6, 7]]), "position_ids": torch.tensor([[0, 1, 0]])}
    assert with_mrope_positions(text, model) is text
    assert with_mrope_positions({"input_ids": text["input_ids"]}, model).keys() == {"input_ids"}
