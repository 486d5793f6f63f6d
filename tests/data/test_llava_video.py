"""Stage-3 video data for LLaVA-OneVision: the video SFT dataset with LLaVA's video format.

Oracle: transformers' ``LlavaOnevisionProcessor`` of the tiny checkpoint on the same decoded
frames, bit for bit (pixel values, and the ``<video>`` token expansion of the same text).
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor

from omnilong.data import collate_padded, decode_video, llava_video_sft_dataset, load_tokenizer
from omnilong.data.chat import render_chat
from omnilong.data.llava_video import LlavaVideoFormat, llava_video_format
from omnilong.hf_io import read_hf_config
from omnilong.testing.tiny_llava_onevision import SIGLIP_MEAN, SIGLIP_STD, TINY_CROP, TINY_PATCH

TINY = dict(frame_size=TINY_CROP, patch_size=TINY_PATCH, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)


@pytest.fixture(scope="module")
def tokenizer(tiny_llava_dir):
    return load_tokenizer(tiny_llava_dir)


def _first_sample(tiny_videos_dir: Path) -> dict:
    return json.loads((tiny_videos_dir / "train.jsonl").read_text().splitlines()[0])


def test_frames_and_tokens_equal_the_processor(tiny_llava_dir, tiny_videos_dir, tokenizer):
    dataset = llava_video_sft_dataset(
        tokenizer, tiny_videos_dir / "train.jsonl", max_seq_len=4096, fps=2.0, max_frames=6, **TINY
    )
    item = dataset[0]
    sample = _first_sample(tiny_videos_dir)
    frames = decode_video(tiny_videos_dir / sample["video"], fps=2.0, max_frames=6).frames  # [T, 3, H, W] uint8
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    messages = dataset._samples[0][0].messages
    text = render_chat(tokenizer, messages)
    assert all(m["content"] in text for m in messages)  # the hub-like template renders text parts only
    expected = processor(text=[text], videos=[frames], return_tensors="pt")
    assert item["pixel_values_videos"].dtype == torch.uint8  # normalised on the model's device:
    normalised = dataset.normalize_pixels(collate_padded([item], dataset.pad_id))["pixel_values_videos"]
    assert torch.equal(normalised, expected["pixel_values_videos"][0])  # bit for bit
    assert item["video_num_frames"].tolist() == [frames.shape[0]]
    assert torch.equal(item["input_ids"], expected["input_ids"][0])
    assert int((item["input_ids"] == dataset.video_token_id).sum()) == frames.shape[0] * 4 + 1


def test_batch_concatenates_videos_of_different_frame_counts(tiny_videos_dir, tokenizer):
    dataset = llava_video_sft_dataset(
        tokenizer, tiny_videos_dir / "train.jsonl", max_seq_len=4096, fps=2.0, max_frames=16, **TINY
    )
    items = [dataset[0], dataset[4]]  # 3 s and 5 s of video
    batch = collate_padded(items, dataset.pad_id)
    counts = [int(i["video_num_frames"]) for i in items]
    assert counts[0] != counts[1]
    assert batch["pixel_values_videos"].shape == (sum(counts), 3, TINY_CROP, TINY_CROP)
    assert batch["video_num_frames"].tolist() == counts


def test_skipped_placeholder_is_one_blank_frame(tiny_videos_dir, tokenizer, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    (tmp_path / "train.jsonl").write_text(json.dumps({**_first_sample(tiny_videos_dir), "video": str(broken)}) + "\n")
    dataset = llava_video_sft_dataset(
        tokenizer, tmp_path / "train.jsonl", max_seq_len=4096, skip_bad_samples=True, **TINY
    )
    item = dataset[0]
    assert bool(item["skipped"]) and (item["labels"] == -100).all()
    assert item["input_ids"].tolist() == [dataset.video_token_id] * 5  # 1 frame * 2x2 pooled + newline
    assert item["pixel_values_videos"].shape == (1, 3, TINY_CROP, TINY_CROP)


def test_format_rejects_a_patch_larger_than_the_frame():
    with pytest.raises(ValueError, match="need 0 < patch_size <= frame_size, got patch_size 14, frame_size 10"):
        LlavaVideoFormat(crop=10, patch=14)


def test_7b_format_counts_196_tokens_per_frame():
    """384 px frames of 14 px patches: 27x27 features pooled to 14x14."""
    assert LlavaVideoFormat().num_tokens(32, (384, 384)) == 32 * 196 + 1


def test_format_comes_from_the_checkpoint_config(tiny_llava_dir, tiny_qwen_dir):
    """The frames are sized as the checkpoint's tower takes them (the recipe passes its config.json
    as ``model_config``); a checkpoint of another family is refused, naming the component to use."""
    config = read_hf_config(tiny_llava_dir)
    assert llava_video_format(config, None, None, SIGLIP_MEAN, SIGLIP_STD) == LlavaVideoFormat(TINY_CROP, TINY_PATCH)
    with pytest.raises(
        ValueError,
        match="the checkpoint is qwen2_5_vl: use its dataset component "
        r"\(omnilong.data.video_sft_dataset for qwen2_5_vl",
    ):
        llava_video_format(read_hf_config(tiny_qwen_dir), None, None, SIGLIP_MEAN, SIGLIP_STD)


def test_data_sized_for_another_tower_is_refused_naming_the_keys(tiny_llava_dir, caplog):
    """``frame_size`` / ``patch_size`` are no longer needed with a checkpoint config: a value it
    disagrees with is an error naming both keys, one it agrees with a warning."""
    config = read_hf_config(tiny_llava_dir)
    with pytest.raises(ValueError, match="dataset.frame_size 384 is not the checkpoint's vision_config image_size 42"):
        llava_video_format(config, 384, None, SIGLIP_MEAN, SIGLIP_STD)
    with pytest.raises(ValueError, match="dataset.patch_size 16 is not the checkpoint's vision_config patch_size 14"):
        llava_video_format(config, None, 16, SIGLIP_MEAN, SIGLIP_STD)
    with caplog.at_level("WARNING"):
        assert llava_video_format(config, TINY_CROP, TINY_PATCH, SIGLIP_MEAN, SIGLIP_STD).crop == TINY_CROP
    assert "dataset.frame_size is no longer needed" in caplog.text


def test_prepared_samples_equal_raw_samples_and_need_the_llava_format(
    tiny_llava_dir, tiny_videos_dir, tokenizer, tmp_path
):
    """``--video-format llava_onevision`` prepares what the raw dataset tokenizes; a directory
    prepared in Qwen2.5-VL's format is refused with the command to rerun."""
    from omnilong.data import prepared_llava_video_sft_dataset
    from omnilong.data.prepare import prepare
    from omnilong.data.prepared import PreparedDataError

    data = tiny_videos_dir / "train.jsonl"
    prepare("video_sft", data, tiny_llava_dir, tmp_path / "prep", progress=False, video_format="llava_onevision")
    raw = llava_video_sft_dataset(tokenizer, data, max_seq_len=4096, **TINY)
    prepared = prepared_llava_video_sft_dataset(tokenizer, tmp_path / "prep", max_seq_len=4096, **TINY)
    assert len(raw) == len(prepared) > 1 and prepared.format == raw.format
    for i in range(len(raw)):
        (sample_a, ids_a, mask_a), (sample_b, ids_b, mask_b) = raw._samples[i], prepared._samples[i]
        assert sample_a == sample_b and torch.equal(ids_a, ids_b) and torch.equal(mask_a, mask_b)
    a, b = raw[0], prepared[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    prepare("video_sft", data, tiny_llava_dir, tmp_path / "qwen", progress=False)
    with pytest.raises(PreparedDataError, match="video_format: prepared None, wanted 'llava_onevision'"):
        prepared_llava_video_sft_dataset(tokenizer, tmp_path / "qwen", max_seq_len=4096, **TINY)
