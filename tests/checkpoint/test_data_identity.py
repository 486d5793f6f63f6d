"""What a checkpoint records of its data (data.json), and the refusal to resume on other data:
a prepared source prepared again from a grown corpus, other weights, or other rows."""

import json

import pytest

from omnilong.checkpoint.run_dir import check_resume_data, data_identity
from omnilong.data import load_tokenizer, prepared_text_dataset
from omnilong.data.prepare import prepare


def _sources(tmp_path, weight=1):
    return [{"path": str(tmp_path / "code"), "weight": weight}, {"path": str(tmp_path / "prose"), "weight": 1}]


def _prepare(tmp_path, tiny_qwen_dir, name, text):
    (tmp_path / f"{name}.txt").write_text(text)
    prepare("text", tmp_path / f"{name}.txt", tiny_qwen_dir, tmp_path / name, progress=False, force=True)


def _saved(tmp_path, identity):
    checkpoint = tmp_path / "step_1"
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / "data.json").write_text(json.dumps(identity))
    return checkpoint


def test_resuming_on_a_source_prepared_again_from_more_data_is_refused_naming_it(tiny_qwen_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_qwen_dir)
    _prepare(tmp_path, tiny_qwen_dir, "code", "def f(x):\n    return x\n" * 40)
    _prepare(tmp_path, tiny_qwen_dir, "prose", "The quick brown fox jumps. " * 40)
    before = data_identity(prepared_text_dataset(tokenizer, _sources(tmp_path), max_seq_len=32))
    assert [(s["path"], s["weight"]) for s in before["sources"]] == [
        (str(tmp_path / "code"), 1),
        (str(tmp_path / "prose"), 1),
    ]
    checkpoint = _saved(tmp_path, before)
    check_resume_data(checkpoint, before, allow_change=False)  # the same data: accepted

    _prepare(tmp_path, tiny_qwen_dir, "prose", "The quick brown fox jumps. " * 80)  # the corpus grew
    after = data_identity(prepared_text_dataset(tokenizer, _sources(tmp_path), max_seq_len=32))
    with pytest.raises(ValueError) as refused:
        check_resume_data(checkpoint, after, allow_change=False)
    message = str(refused.value)
    assert f"this run's data differs from what {checkpoint / 'data.json'} records: rows (" in message
    old, new = before["sources"][1], after["sources"][1]
    assert f"sources[1].fingerprint ({old['fingerprint']!r} -> {new['fingerprint']!r})" in message
    assert f"sources[1].tokens ({old['tokens']} -> {new['tokens']})" in message
    assert "sources[0]" not in message  # code is unchanged
    check_resume_data(checkpoint, after, allow_change=True)  # allow_config_change_on_resume

    reweighted = data_identity(prepared_text_dataset(tokenizer, _sources(tmp_path, weight=3), max_seq_len=32))
    with pytest.raises(ValueError, match=r"sources\[0\]\.weight \(1\.0 -> 3\.0\)"):
        check_resume_data(_saved(tmp_path, after), reweighted, allow_change=False)


def test_a_checkpoint_without_data_json_is_not_checked(tmp_path):
    (tmp_path / "step_1").mkdir()
    check_resume_data(tmp_path / "step_1", {"dataset": "ChatDataset", "rows": 3}, allow_change=False)


def test_other_rows_of_a_dataset_that_is_not_prepared_are_refused(tmp_path):
    checkpoint = _saved(tmp_path, data_identity(list(range(205))))
    with pytest.raises(ValueError, match=r"rows \(205 -> 4635\)"):
        check_resume_data(checkpoint, data_identity(list(range(4635))), allow_change=False)
