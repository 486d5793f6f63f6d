"""Stage-1 packing: every token lands in exactly one row, documents never leak into each other."""

import json

import pytest
import torch

from omnilong.data import PackedTextDataset, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen_dir):
    return load_tokenizer(tiny_qwen_dir)


def _write(path, text):
    path.write_text(text)
    return path


def test_rows_hold_the_stream_with_separators_and_shifted_labels(tokenizer, tmp_path):
    docs = ["def f(x):\n    return x\n", "import os\nprint(os.sep)\n", "class A:\n    pass\n"]
    files = [_write(tmp_path / f"doc{i}.py", d) for i, d in enumerate(docs)]
    ds = PackedTextDataset(tokenizer, files, max_seq_len=8, separator_token="<|endoftext|>")
    sep = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    expected = [t for d in docs for t in (*tokenizer(d, add_special_tokens=False)["input_ids"], sep)]
    rows = [ds[i] for i in range(len(ds))]
    assert len(ds) == -(-len(expected) // 8)
    stream = torch.cat([r["input_ids"] for r in rows])[: len(expected)]
    assert stream.tolist() == expected
    labels = torch.cat([r["labels"] for r in rows])[: len(expected)]
    for i, token in enumerate(expected[:-1]):
        # the separator predicts nothing; every other token predicts the next one
        assert labels[i] == (-100 if token == sep else expected[i + 1])
    assert all(r["input_ids"].shape == (8,) for r in rows)


def test_positions_and_document_ids_restart_per_document(tokenizer, tmp_path):
    f = _write(tmp_path / "docs.jsonl", "\n".join(json.dumps({"text": t}) for t in ["a b c", "d e", "f g h i"]) + "\n")
    ds = PackedTextDataset(tokenizer, [f], max_seq_len=64)
    row = ds[0]
    doc = row["document_ids"]
    assert doc[0] == 0 and (doc.diff() >= 0).all()
    for d in doc.unique():
        positions = row["position_ids"][doc == d]
        assert positions.tolist() == list(range(len(positions)))
    # the padding at the end of the last row is its own document with ignored labels
    pad = row["input_ids"] == tokenizer.pad_token_id
    assert (row["labels"][pad] == -100).all() and (doc[pad] == doc.max()).all()


def test_malformed_jsonl_line_is_named(tokenizer, tmp_path):
    f = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        PackedTextDataset(tokenizer, [f], max_seq_len=16)


def test_record_without_text_field_is_named(tokenizer, tmp_path):
    f = _write(tmp_path / "nofield.jsonl", '{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"nofield\.jsonl:1: .*'text'"):
        PackedTextDataset(tokenizer, [f], max_seq_len=16)


def test_empty_dataset_and_bad_lengths_are_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="no non-empty document"):
        PackedTextDataset(tokenizer, [_write(tmp_path / "empty.txt", "  \n")], max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len must be positive"):
        PackedTextDataset(tokenizer, [_write(tmp_path / "a.txt", "x")], max_seq_len=0)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        PackedTextDataset(tokenizer, [tmp_path / "missing/*.txt"], max_seq_len=16)


def test_parquet_documents(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first doc", "second doc"]}), tmp_path / "d.parquet")
    ds = PackedTextDataset(tokenizer, [tmp_path / "d.parquet"], max_seq_len=32)
    assert ds.num_documents == 2 and len(ds) == 1
