"""Prepared data: tokenized once into memory maps, read lazily, never served to another
tokenizer. Oracle: the raw-file datasets, which must give the very same rows (exact equality)."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from omnilong.data import (
    PackedTextDataset,
    PreparedDataError,
    chat_dataset,
    load_tokenizer,
    prepared_chat_dataset,
    prepared_text_dataset,
    prepared_video_sft_dataset,
    video_sft_dataset,
)
from omnilong.data import prepare as prepare_module
from omnilong.data.prepare import prepare

SEP = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen_dir):
    return load_tokenizer(tiny_qwen_dir)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _text_corpus(tmp_path):
    """Plain-text files and a JSONL file with an empty document among them."""
    (tmp_path / "a.py").write_text("def f(x):\n    return x * 2\n" * 7)
    (tmp_path / "b.txt").write_text("import os\nprint(os.sep)\n")
    _jsonl(tmp_path / "c.jsonl", [{"text": "class A:\n    pass\n" * 5}, {"text": "  \n"}, {"text": "x = 1"}])
    return [tmp_path / "a.py", tmp_path / "b.txt", tmp_path / "c.jsonl"]


def _assert_same_rows(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        ra, rb = a[i], b[i]
        assert ra.keys() == rb.keys()
        for key in ra:
            assert ra[key].dtype == rb[key].dtype and torch.equal(ra[key], rb[key]), (i, key)


@pytest.mark.parametrize("workers", [1, 2])
def test_prepared_text_rows_equal_raw_rows(tokenizer, tiny_qwen_dir, tmp_path, monkeypatch, workers):
    monkeypatch.setattr(prepare_module, "_TEXT_BATCH_CHARS", 40)  # many batches: order across workers matters
    files = _text_corpus(tmp_path)
    meta = prepare(
        "text", files, tiny_qwen_dir, tmp_path / "prep", workers=workers, separator_token=SEP, progress=False
    )
    assert meta["num_skipped"] == {"empty_documents": 1, "bad_samples": 0}
    raw = PackedTextDataset(tokenizer, files, max_seq_len=16, separator_token=SEP)
    prepared = prepared_text_dataset(tokenizer, tmp_path / "prep", max_seq_len=16, separator_token=SEP)
    assert meta["num_tokens"] == raw.num_tokens and len(prepared) > 3  # documents span rows
    assert isinstance(prepared.tokens, np.memmap)  # read lazily, not loaded
    _assert_same_rows(raw, prepared)
    sent_to_a_worker = pickle.dumps(prepared)  # as to a DataLoader worker started by spawn
    assert len(sent_to_a_worker) < 1000  # the file's path, not its tokens
    _assert_same_rows(raw, pickle.loads(sent_to_a_worker))


@pytest.mark.parametrize("packed", [False, True])
def test_prepared_chat_rows_equal_raw_rows_and_skip_the_same(tokenizer, tiny_qwen_dir, tmp_path, packed):
    def conversation(answer):
        return {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "name one"},
                {"role": "assistant", "content": answer},
            ]
        }

    f = _jsonl(tmp_path / "c.jsonl", [conversation("pathlib"), conversation("x " * 100), conversation("os")])
    prepare("chat", f, tiny_qwen_dir, tmp_path / "prep", progress=False)
    with pytest.raises(ValueError, match=r"c\.jsonl:2: sample has \d+ tokens, more than max_seq_len=64"):
        prepared_chat_dataset(tokenizer, tmp_path / "prep", max_seq_len=64)
    raw = chat_dataset(tokenizer, f, max_seq_len=64, skip_bad_samples=True, packed=packed)
    prepared = prepared_chat_dataset(tokenizer, tmp_path / "prep", max_seq_len=64, skip_bad_samples=True, packed=packed)
    assert prepared.num_skipped == raw.num_skipped == 1
    assert len(raw) == (1 if packed else 2)  # packed: both kept samples share a row
    _assert_same_rows(raw, prepared)


def test_prepare_skips_and_counts_malformed_chat_samples_or_names_them(tiny_qwen_dir, tmp_path):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    f = _jsonl(tmp_path / "c.jsonl", [good, {"messages": [{"role": "robot", "content": "x"}]}, good])
    with pytest.raises(ValueError, match=r"c\.jsonl:2: message 0"):
        prepare("chat", f, tiny_qwen_dir, tmp_path / "prep", progress=False)
    meta = prepare("chat", f, tiny_qwen_dir, tmp_path / "prep", skip_bad_samples=True, progress=False)
    assert meta["num_documents"] == 2 and meta["num_skipped"]["bad_samples"] == 1


def test_prepare_refuses_a_template_that_renders_no_text_even_when_skipping(tiny_qwen_dir, tmp_path):
    roles_only = load_tokenizer(tiny_qwen_dir)
    roles_only.chat_template = "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '<|im_end|>' }}{%- endfor %}"
    roles_only.save_pretrained(tmp_path / "tok")
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(ValueError, match=r"the chat template of .*tok.* renders a message's text neither"):
        prepare(
            "chat", _jsonl(tmp_path / "c.jsonl", [good]), tmp_path / "tok", tmp_path / "prep", skip_bad_samples=True
        )


def test_prepared_video_samples_equal_raw_samples(tokenizer, tiny_qwen_dir, tiny_videos_dir, tmp_path):
    prepare("video_sft", tiny_videos_dir / "train.jsonl", tiny_qwen_dir, tmp_path / "prep", progress=False)
    raw = video_sft_dataset(tokenizer, tiny_videos_dir / "train.jsonl", max_seq_len=512)
    prepared = prepared_video_sft_dataset(tokenizer, tmp_path / "prep", max_seq_len=512)
    assert len(raw) == len(prepared) > 1
    for i in range(len(raw)):
        (sample_a, ids_a, mask_a), (sample_b, ids_b, mask_b) = raw._samples[i], prepared._samples[i]
        assert sample_a == sample_b and torch.equal(ids_a, ids_b) and torch.equal(mask_a, mask_b)
    _assert_same_rows([raw[0]], [prepared[0]])  # one item decoded end to end


def test_another_tokenizer_is_refused_with_the_command_to_rerun(tiny_qwen_dir, tmp_path):
    prepare("text", _text_corpus(tmp_path), tiny_qwen_dir, tmp_path / "prep", separator_token=SEP, progress=False)
    changed = load_tokenizer(tiny_qwen_dir)
    changed.add_tokens(["<|new_token|>"])  # one more token: ids could differ
    with pytest.raises(PreparedDataError, match=r"another tokenizer.*rerun `python tools/prepare_data.py --kind text"):
        prepared_text_dataset(changed, tmp_path / "prep", max_seq_len=16, separator_token=SEP)


def test_other_settings_kind_or_no_preparation_are_refused(tokenizer, tiny_qwen_dir, tmp_path):
    prepare("text", _text_corpus(tmp_path), tiny_qwen_dir, tmp_path / "prep", separator_token=SEP, progress=False)
    with pytest.raises(PreparedDataError, match=r"other settings \(separator_id: prepared \d+, wanted \d+\)"):
        prepared_text_dataset(tokenizer, tmp_path / "prep", max_seq_len=16, separator_token="<|im_end|>")
    with pytest.raises(PreparedDataError, match=r"holds 'text' data, the dataset expects 'chat'"):
        prepared_chat_dataset(tokenizer, tmp_path / "prep", max_seq_len=16)
    with pytest.raises(PreparedDataError, match=r"not a prepared data directory.*tools/prepare_data.py --kind text"):
        prepared_text_dataset(tokenizer, tmp_path, max_seq_len=16)


def test_a_failed_prepare_leaves_the_previous_directory_and_no_partial_one(tiny_qwen_dir, tmp_path):
    files = _text_corpus(tmp_path)
    prepare("text", files, tiny_qwen_dir, tmp_path / "prep", separator_token=SEP, progress=False)
    before = (tmp_path / "prep" / "tokens.u32").read_bytes()
    bad = tmp_path / "z.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"z\.jsonl:2: malformed JSON"):
        prepare("text", [*files, bad], tiny_qwen_dir, tmp_path / "prep", separator_token=SEP, progress=False)
    assert (tmp_path / "prep" / "tokens.u32").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("prep")) == ["prep"]


def test_preparing_again_is_a_no_op_until_a_source_changes(tiny_qwen_dir, tmp_path):
    files = _text_corpus(tmp_path)
    args = ("text", files, tiny_qwen_dir, tmp_path / "prep")
    assert not prepare(*args, separator_token=SEP, progress=False)["up_to_date"]
    assert prepare(*args, separator_token=SEP, progress=False)["up_to_date"]
    os.utime(files[1], ns=(0, 0))
    assert not prepare(*args, separator_token=SEP, progress=False)["up_to_date"]
    assert not prepare(*args, progress=False)["up_to_date"]  # another separator


def test_bad_sources_entry_is_named(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"dataset.sources\[1\] must be a path or \{path"):
        prepared_text_dataset(tokenizer, [str(tmp_path), {"path": str(tmp_path), "weight": -1}], max_seq_len=8)
