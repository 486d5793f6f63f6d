"""Reading back append-only JSON-lines files after a crash: a torn last line is dropped (and
cut from the file), any other bad line is an error naming the file and line."""

import json

import pytest

from omnilong.jsonl import read_appended_jsonl


def test_torn_last_line_is_dropped_with_a_warning_and_cut_from_the_file(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_appended_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert f"{path}: dropped its torn last line 3 (15 bytes without a newline" in caplog.text
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'  # the next append starts a line of its own


def test_whole_last_record_without_its_newline_is_kept_and_ended(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}')
    assert read_appended_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'


def test_without_repair_the_file_is_left_as_it_is(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xc3')  # cut inside a UTF-8 character
    assert read_appended_jsonl(path, repair=False) == [{"a": 1}]
    assert path.read_bytes() == b'{"a": 1}\n{"a": "\xc3'


@pytest.mark.parametrize("text", ['{"step": 1}\n{"step": 2\n{"step": 3}\n', '{"step": 1}\nnot json\n'])
def test_a_bad_line_that_is_not_a_torn_tail_names_the_file_and_line(tmp_path, text):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{path}:2: not a JSON line \("):
        read_appended_jsonl(path)
    assert path.read_text() == text


def test_blank_lines_are_ignored(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n\n" + json.dumps({"step": 2}) + "\n")
    assert read_appended_jsonl(path) == [{"step": 1}, {"step": 2}]
