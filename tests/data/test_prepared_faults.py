"""Prepared data under faults and misuse: an --output that is not prepared data, a
truncated or damaged directory, a re-prepare while a run reads it, a full disk, bad lines,
bad videos, and records naming paths outside their data directory. Each case is refused
with a one-line error naming the file (or skipped and counted where asked), and no data
is lost."""

import errno
import json
import pickle
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from omnilong.data import PreparedDataError, load_tokenizer, prepared_chat_dataset, prepared_text_dataset
from omnilong.data import prepared as prepared_module
from omnilong.data.prepare import prepare
from omnilong.data.prepared import open_prepared, verify_prepared

SEP = "<|endoftext|>"
TOOL = Path(__file__).resolve().parents[2] / "tools" / "prepare_data.py"


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen_dir):
    return load_tokenizer(tiny_qwen_dir)


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _chat(answer: str) -> dict:
    return {"messages": [{"role": "user", "content": "name one"}, {"role": "assistant", "content": answer}]}


def _text(tmp_path: Path) -> Path:
    return _jsonl(tmp_path / "corpus.jsonl", [{"text": f"def f{i}(x):\n    return x * {i}\n" * 3} for i in range(6)])


def _tool(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``tools/prepare_data.py args`` in this process: ``(exit code, stdout + stderr)``."""
    monkeypatch.setattr(sys, "argv", [str(TOOL), *args])
    try:
        runpy.run_path(str(TOOL), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        print(e.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_output_holding_a_source_or_other_files_is_refused_and_nothing_deleted(
    tiny_qwen_dir, tmp_path, monkeypatch, capsys
):
    data = tmp_path / "data"
    data.mkdir()
    corpus = _text(data)
    (data / "notes.txt").write_text("mine")
    args = ["--kind", "text", "--tokenizer", str(tiny_qwen_dir), "--workers", "1"]
    code, out = _tool(monkeypatch, capsys, *args, "--output", str(data), str(corpus))  # the case
    assert code != 0 and f"--output {data} holds the source {corpus}" in out and "Traceback" not in out
    elsewhere = _text(tmp_path)
    with pytest.raises(ValueError, match=r"data is not a prepared data directory \(it holds corpus.jsonl, notes.txt"):
        prepare("text", elsewhere, tiny_qwen_dir, data, progress=False)
    with pytest.raises(ValueError, match=r"notes.txt exists and is not a directory"):
        prepare("text", elsewhere, tiny_qwen_dir, data / "notes.txt", progress=False)
    assert sorted(p.name for p in data.iterdir()) == ["corpus.jsonl", "notes.txt"]  # all kept

    prepare("text", elsewhere, tiny_qwen_dir, tmp_path / "prep", separator_token=SEP, progress=False)
    (tmp_path / "prep" / "mine.txt").write_text("a file put into a prepared directory")
    with pytest.raises(ValueError, match=r"prep is not a prepared data directory \(it holds mine.txt\)"):
        prepare("text", elsewhere, tiny_qwen_dir, tmp_path / "prep", progress=False, force=True)
    (tmp_path / "prep" / "mine.txt").unlink()
    (tmp_path / "empty").mkdir()
    for output in ("prep", "empty"):  # a prepared directory and an empty one are replaced
        meta = prepare("text", elsewhere, tiny_qwen_dir, tmp_path / output, progress=False, force=True)
        assert not meta["up_to_date"] and meta["num_documents"] == 6


def test_truncated_directory_is_refused_at_open_and_prepared_again(tokenizer, tiny_qwen_dir, tmp_path):
    corpus = _text(tmp_path)
    args = ("text", corpus, tiny_qwen_dir, tmp_path / "prep")
    prepare(*args, separator_token=SEP, progress=False)
    full = len(prepared_text_dataset(tokenizer, tmp_path / "prep", max_seq_len=16, separator_token=SEP))
    tokens = tmp_path / "prep" / "tokens.u32"
    size, half = tokens.stat().st_size, tokens.stat().st_size // 8 * 4  # cut in half, whole tokens
    with open(tokens, "r+b") as f:
        f.truncate(half)
    with pytest.raises(PreparedDataError, match=rf"tokens.u32 has {half:,} bytes, .* says {size:,}: truncated"):
        prepared_text_dataset(tokenizer, tmp_path / "prep", max_seq_len=16, separator_token=SEP)
    assert not prepare(*args, separator_token=SEP, progress=False)["up_to_date"]  # not "up to date"
    assert len(prepared_text_dataset(tokenizer, tmp_path / "prep", max_seq_len=16, separator_token=SEP)) == full


def test_truncated_records_of_a_chat_directory_are_refused(tokenizer, tiny_qwen_dir, tmp_path):
    prepare(
        "chat", _jsonl(tmp_path / "c.jsonl", [_chat("a"), _chat("b")]), tiny_qwen_dir, tmp_path / "p", progress=False
    )
    records = tmp_path / "p" / "records.jsonl"
    records.write_bytes(records.read_bytes()[:-5])
    with pytest.raises(PreparedDataError, match=r"records.jsonl has \d+ bytes, .*truncated or damaged; rerun `"):
        prepared_chat_dataset(tokenizer, tmp_path / "p", max_seq_len=64)


def test_verify_finds_a_changed_byte_and_old_directories_stay_readable(
    tokenizer, tiny_qwen_dir, tmp_path, monkeypatch, capsys
):
    prepare(
        "chat", _jsonl(tmp_path / "c.jsonl", [_chat("a"), _chat("b")]), tiny_qwen_dir, tmp_path / "p", progress=False
    )
    code, out = _tool(monkeypatch, capsys, "--verify", str(tmp_path / "p"))
    assert code == 0 and "every file matches its checksum" in out
    trainable = tmp_path / "p" / "trainable.u8"
    data = bytearray(trainable.read_bytes())
    data[0] ^= 1  # same size: only the checksum can tell
    trainable.write_bytes(bytes(data))
    prepared_chat_dataset(tokenizer, tmp_path / "p", max_seq_len=64)  # sizes are fine
    code, out = _tool(monkeypatch, capsys, "--verify", str(tmp_path / "p"))
    assert code != 0 and f"{trainable}: contents differ from the checksums in meta.json" in out

    meta_path = tmp_path / "p" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["sha256"]  # as prepared before checksums were recorded
    meta_path.write_text(json.dumps(meta))
    assert len(prepared_chat_dataset(tokenizer, tmp_path / "p", max_seq_len=64, packed=False)) == 2
    with pytest.raises(PreparedDataError, match=r"prepared before checksums were recorded: its file sizes match"):
        verify_prepared(tmp_path / "p")


def test_damaged_meta_json_is_named_with_the_fix_and_prepared_again(tokenizer, tiny_qwen_dir, tmp_path):
    corpus = _text(tmp_path)
    prepare("text", corpus, tiny_qwen_dir, tmp_path / "prep", separator_token=SEP, progress=False)
    meta_path = tmp_path / "prep" / "meta.json"
    meta_path.write_text(meta_path.read_text()[:40])  # cut short
    with pytest.raises(PreparedDataError, match=rf"{meta_path} is damaged \(not JSON: .*--force"):
        prepared_text_dataset(tokenizer, tmp_path / "prep", max_seq_len=16, separator_token=SEP)
    meta_path.write_text('{"format_version": 1, "kind": "text"}')
    with pytest.raises(PreparedDataError, match=r"meta.json is damaged \(bad or missing num_tokens, num_documents"):
        prepared_text_dataset(tokenizer, tmp_path / "prep", max_seq_len=16, separator_token=SEP)
    assert not prepare("text", corpus, tiny_qwen_dir, tmp_path / "prep", separator_token=SEP, progress=False)[
        "up_to_date"
    ]
    prepared_text_dataset(tokenizer, tmp_path / "prep", max_seq_len=16, separator_token=SEP)


def test_a_run_keeps_reading_the_version_it_opened_while_the_directory_is_prepared_again(
    tokenizer, tiny_qwen_dir, tmp_path
):
    first = _jsonl(tmp_path / "first.jsonl", [_chat("alpha"), _chat("beta")])
    second = _jsonl(tmp_path / "second.jsonl", [_chat("gamma " * 5), _chat("delta " * 3), _chat("x")])
    prepare("chat", first, tiny_qwen_dir, tmp_path / "prep", progress=False)
    opened = open_prepared(tmp_path / "prep", "chat", tokenizer, {})
    tokens = np.array(opened.tokens)
    prepare("chat", second, tiny_qwen_dir, tmp_path / "prep", progress=False)  # while "the run" reads it
    assert np.array_equal(opened.tokens, tokens) and opened.num_documents == 2
    assert opened.record(1)["origin"] == f"{first}:2"  # text and record of one version, not mixed
    with pytest.raises(PreparedDataError, match=r"tokens.u32 was replaced \(prepared again\) after this run opened"):
        pickle.loads(pickle.dumps(opened.tokens))  # a spawned DataLoader worker: refuses, never mixes
    assert open_prepared(tmp_path / "prep", "chat", tokenizer, {}).record(1)["origin"] == f"{second}:2"


def test_full_disk_names_the_place_removes_the_temporary_directory_and_keeps_the_previous_data(
    tiny_qwen_dir, tmp_path, monkeypatch
):
    corpus = _text(tmp_path)
    prepare("text", corpus, tiny_qwen_dir, tmp_path / "prep", separator_token=SEP, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "prep").iterdir()}

    class FullDisk:
        """A file being written on a full disk: writes fail, and so does the flush on close."""

        def __init__(self, f):
            self.f, self.failed = f, False

        def write(self, data):
            self.failed = True
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.f.close()
            if self.failed:
                raise OSError(errno.ENOSPC, "No space left on device")

    real_open = open

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FullDisk(f) if "w" in mode and str(file).endswith("tokens.u32") else f

    monkeypatch.setattr(prepared_module, "open", open_on_full_disk, raising=False)
    with pytest.raises(OSError, match=rf"no space left on {tmp_path} while preparing .*prep: removed prep.tmp-") as e:
        prepare("text", corpus, tiny_qwen_dir, tmp_path / "prep", progress=False)  # another separator: re-prepares
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("prep")) == ["prep"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "prep").iterdir()} == before


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_skip_bad_samples_skips_and_counts_unparsable_lines(tiny_qwen_dir, tmp_path, kind):
    good = {"text": "x = 1"} if kind == "text" else _chat("a")
    f = _jsonl(tmp_path / "c.jsonl", [good, '{"broken', good, "not json at all"])
    with pytest.raises(ValueError, match=r"c\.jsonl:2: malformed JSON line"):
        prepare(kind, f, tiny_qwen_dir, tmp_path / "prep", progress=False)
    meta = prepare(kind, f, tiny_qwen_dir, tmp_path / "prep", skip_bad_samples=True, progress=False)
    assert meta["num_documents"] == 2 and meta["num_skipped"]["bad_samples"] == 2


def _bad_videos(root: Path) -> None:
    """An empty, a corrupt and an audio-only video in ``root``."""
    from torchcodec.encoders import AudioEncoder

    (root / "empty.mp4").write_bytes(b"")
    (root / "corrupt.mp4").write_bytes(bytes(range(256)) * 8)
    AudioEncoder(torch.zeros(1, 1600), sample_rate=16000).to_file(str(root / "audio_only.mp4"))


def test_unreadable_videos_are_refused_or_skipped_at_prepare(tiny_qwen_dir, tiny_videos_dir, tmp_path):
    root = tmp_path / "videos"
    shutil.copytree(tiny_videos_dir, root)
    _bad_videos(root)
    samples = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()][:2]
    bad = [{**samples[0], "video": name} for name in ("empty.mp4", "corrupt.mp4", "audio_only.mp4")]
    for i, sample in enumerate(bad):
        f = _jsonl(root / f"bad{i}.jsonl", [samples[1], sample])
        with pytest.raises(ValueError, match=rf"bad{i}\.jsonl:2: .*{sample['video']}: cannot decode video"):
            prepare("video_sft", f, tiny_qwen_dir, tmp_path / "prep", progress=False)
    f = _jsonl(root / "mixed.jsonl", [samples[0], *bad, samples[1]])
    meta = prepare("video_sft", f, tiny_qwen_dir, tmp_path / "prep", skip_bad_samples=True, progress=False)
    assert meta["num_documents"] == 2 and meta["num_skipped"]["bad_samples"] == 3


def test_videos_outside_the_data_directory_are_refused_at_prepare_and_at_open(
    tokenizer, tiny_qwen_dir, tiny_videos_dir, tmp_path
):
    from omnilong.data import prepared_video_sft_dataset

    root = tmp_path / "videos"
    shutil.copytree(tiny_videos_dir, root)
    sample = json.loads((root / "train.jsonl").read_text().splitlines()[0])
    shutil.copy(root / sample["video"], tmp_path / "elsewhere.mp4")
    outside = _jsonl(root / "outside.jsonl", [sample, {**sample, "video": "../elsewhere.mp4"}])
    with pytest.raises(ValueError, match=rf"outside\.jsonl:2: video {tmp_path}/elsewhere.mp4 lies outside the data"):
        prepare("video_sft", outside, tiny_qwen_dir, tmp_path / "prep", progress=False)

    prepare("video_sft", _jsonl(root / "ok.jsonl", [sample, sample]), tiny_qwen_dir, tmp_path / "prep", progress=False)
    prep = tmp_path / "prep"
    records = [json.loads(line) for line in (prep / "records.jsonl").read_text().splitlines()]
    records[1]["videos"] = [str(root / ".." / "elsewhere.mp4")]  # a tampered (or hand-made) record
    lines = [(json.dumps(r) + "\n").encode() for r in records]
    (prep / "records.jsonl").write_bytes(b"".join(lines))
    (prep / "records.i64").write_bytes(np.cumsum([0] + [len(b) for b in lines], dtype="<i8").tobytes())
    dataset = prepared_video_sft_dataset(tokenizer, prep, max_seq_len=4096, skip_bad_samples=True)
    assert dataset[0]["input_ids"].numel() > 0
    with pytest.raises(PreparedDataError, match=r"records.jsonl: record 1 \(.*ok.jsonl:2\) names a video outside"):
        dataset[1]
