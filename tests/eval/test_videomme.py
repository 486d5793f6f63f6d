"""Video-MME on a tiny Video-MME-shaped folder (two generated videos, four questions, one
subtitle file) with the tiny random model (each family's for a whole run): data reading,
subtitles at the sampled frames, the official prompt, both subtitle settings, resuming (only
with the same run settings; a torn last line), re-scoring, the results format, and missing
videos."""

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from omnilong.eval.videomme import (
    build_prompt_text,
    checkpoint_fingerprint,
    read_answers,
    read_questions,
    read_subtitles,
    run_videomme,
    subtitles_at,
    tidy_answers,
)
from omnilong.eval.videomme_scoring import extract_answer
from omnilong.testing.tiny_eval_data import write_tiny_videomme


@pytest.fixture(scope="module")
def videomme_root(tmp_path_factory, tiny_videos_dir):
    return write_tiny_videomme(tmp_path_factory.mktemp("videomme"), tiny_videos_dir)


def test_subtitles_kept_only_at_sampled_frame_times(videomme_root):
    cues = read_subtitles(videomme_root / "subtitle" / "tiny000.srt")
    assert cues == [(0.0, 0.9, "a square appears"), (1.01, 1.02, "between two frames")]  # tags removed
    assert subtitles_at(cues, [0.0, 0.5, 1.0, 1.5]) == ["a square appears"]
    assert subtitles_at(cues, [1.015]) == ["between two frames"]
    assert subtitles_at(cues, [0.9]) == []  # a cue ends before its end time


def test_official_prompt_with_and_without_subtitles(videomme_root):
    question = read_questions(videomme_root / "videomme" / "test-00000-of-00001.parquet")[0]
    without = build_prompt_text(question, None)
    assert without.splitlines() == [
        "Select the best answer to the following multiple-choice question based on the video. Respond with only "
        "the letter (A, B, C, or D) of the correct option.",
        "What colour is the square?",
        "A. red",
        "B. green",
        "C. blue",
        "D. yellow",
        "The best answer is:",
    ]
    with_subs = build_prompt_text(question, ["a square appears"]).splitlines()
    assert with_subs[:2] == ["This video's subtitles are listed below:", "a square appears"]
    assert "based on the video and the subtitles." in with_subs[2]
    assert build_prompt_text(question, []).splitlines()[1] == "No subtitles available"


def _answers(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_writes_scores_and_resumes(family_inference, videomme_root, tmp_path, caplog):
    loaded, family = family_inference
    results = run_videomme(loaded, family, videomme_root, tmp_path, loaded.model_dir, max_new_tokens=2)
    answers = _answers(tmp_path / "answers.jsonl")
    assert len(answers) == 8  # 4 questions x (without, with subtitles)
    assert {a["subtitles"] for a in answers} == {False, True}
    assert all(a["frames"] <= 4 for a in answers)
    assert all(a["settings"] == results["settings"] and "extracted" not in a for a in answers)
    assert results["settings"]["max_new_tokens"] == 2 and results["extraction"]["name"] == "official"
    for setting in ("without_subtitles", "with_subtitles"):
        mine = [a for a in answers if a["subtitles"] == (setting == "with_subtitles")]
        scores = results[setting]
        assert scores["questions"] == 4 and set(scores["by_duration"]) == {"short", "medium", "long"}
        assert set(scores["by_sub_category"]) == {"Technology"}
        assert scores["correct"] == sum(extract_answer(a["response"]) == a["answer"] for a in mine)
        # the benchmark's results format: per video its questions with the raw response
        submission = json.loads((tmp_path / scores["submission"]).read_text())
        assert [v["video_id"] for v in submission] == ["0", "1"] and not any(v["missing"] for v in submission)
        assert {q["question_id"]: q["response"] for v in submission for q in v["questions"]} == {
            a["question_id"]: a["response"] for a in mine
        }
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert results["answers_file"] == {"reused": 0, "torn_last_line_dropped": 0, "moved_to": None}

    # A rerun answers only what is missing from answers.jsonl; the last answer, torn in the
    # middle (the run was killed while writing it), is dropped (counted) and made again.
    lines = (tmp_path / "answers.jsonl").read_text().splitlines()
    (tmp_path / "answers.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
    rerun = run_videomme(loaded, family, videomme_root, tmp_path, loaded.model_dir, max_new_tokens=2)
    assert (tmp_path / "answers.jsonl").read_text().splitlines() == lines  # greedy: the same answer again
    assert rerun["answers_file"] == {"reused": 7, "torn_last_line_dropped": 1, "moved_to": None}
    assert {**rerun, "answers_file": None} == {**results, "answers_file": None}
    assert f"{tmp_path / 'answers.jsonl'}: dropped its torn last line 8" in caplog.text


def test_answers_are_reused_only_with_the_same_settings(tiny_inference, tiny_qwen_dir, videomme_root, tmp_path):
    """Frame sampling, pixel limits, max_new_tokens and the checkpoint are recorded with each
    answer; a rerun with any of them changed refuses, naming it, or starts a new file."""
    loaded, family = tiny_inference
    out = tmp_path / "out"
    first = dict(subtitle_settings=(False,), max_new_tokens=1, limit=2)
    run_videomme(loaded, family, videomme_root, out, tiny_qwen_dir, **first)
    before = (out / "answers.jsonl").read_text()
    changed = dict(first, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"answers.jsonl: its 2 answers .*: max_new_tokens \(1 -> 2\); .*new-file"):
        run_videomme(loaded, family, videomme_root, out, tiny_qwen_dir, **changed)
    with pytest.raises(ValueError, match=r"fps \(1.0 -> None\), max_frames \(4 -> None\), num_frames \(None -> 2\)"):
        run_videomme(loaded, family, videomme_root, out, tiny_qwen_dir, **dict(first, num_frames=2))
    other = tmp_path / "other"  # the same checkpoint with one weight byte changed
    shutil.copytree(tiny_qwen_dir, other)
    weights = next(other.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    recorded = rf"checkpoint \('[0-9a-f]{{16}}' at {re.escape(str(tiny_qwen_dir))} -> '[0-9a-f]{{16}}'\)"
    with pytest.raises(ValueError, match=rf"answers were made with other settings than this run's: {recorded}"):
        run_videomme(loaded, family, videomme_root, out, other, **first)
    assert (out / "answers.jsonl").read_text() == before  # refusing changes nothing

    results = run_videomme(loaded, family, videomme_root, out, tiny_qwen_dir, **changed, on_settings_change="new-file")
    assert (out / "answers.1.jsonl").read_text() == before
    assert results["answers_file"] == {
        "reused": 0,
        "torn_last_line_dropped": 0,
        "moved_to": str(out / "answers.1.jsonl"),
    }
    assert [a["settings"]["max_new_tokens"] for a in _answers(out / "answers.jsonl")] == [2, 2]

    # answers from before settings were recorded are not trusted either
    (out / "answers.jsonl").write_text(
        "".join(
            json.dumps({k: v for k, v in a.items() if k != "settings"}) + "\n" for a in _answers(out / "answers.jsonl")
        )
    )
    with pytest.raises(ValueError, match=r"settings \(not recorded"):
        run_videomme(loaded, family, videomme_root, out, tiny_qwen_dir, **changed)


def test_checkpoint_fingerprint_follows_the_weights_not_the_path(tiny_qwen_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_qwen_dir, copy)
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(tiny_qwen_dir)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1  # a byte the fingerprint does not read: same
    weights.write_bytes(bytes(data))
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(tiny_qwen_dir)
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert checkpoint_fingerprint(copy) != checkpoint_fingerprint(tiny_qwen_dir)


def test_a_change_of_extraction_rescores_the_stored_responses(tiny_inference, videomme_root, tmp_path, monkeypatch):
    """Scores are read from the raw responses with the chosen extraction: no answer is made
    again, and a stored letter is ignored."""
    loaded, family = tiny_inference
    run = dict(subtitle_settings=(False,), max_new_tokens=1)
    run_videomme(loaded, family, videomme_root, tmp_path, loaded.model_dir, **run)
    answers = _answers(tmp_path / "answers.jsonl")
    for a in answers:  # as a model might answer: right under the official rules
        a.update(response=f"Answer: {a['answer']}", extracted="X")
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    monkeypatch.setattr("omnilong.eval.videomme.generate_answer", lambda *a: pytest.fail("answered again"))
    official = run_videomme(loaded, family, videomme_root, tmp_path, loaded.model_dir, **run)
    first = run_videomme(loaded, family, videomme_root, tmp_path, loaded.model_dir, **run, extraction="lmms-eval")
    assert official["without_subtitles"]["correct"] == 4
    assert first["without_subtitles"]["correct"] == sum(a["answer"] == "A" for a in answers)  # the A of "Answer"
    assert first["extraction"]["name"] == "lmms-eval" and "4e7566d" in first["extraction"]["source"]
    with pytest.raises(ValueError, match="unknown Video-MME extraction"):
        run_videomme(loaded, family, videomme_root, tmp_path, loaded.model_dir, **run, extraction="gpt")


def test_missing_video_stops_before_work_unless_skipped(tiny_inference, videomme_root, tmp_path):
    loaded, family = tiny_inference
    broken = tmp_path / "root"
    (broken / "videomme").mkdir(parents=True)
    (broken / "data").mkdir()
    (broken / "videomme" / "q.jsonl").write_text(
        "".join(
            json.dumps(q) + "\n" for q in read_questions(videomme_root / "videomme" / "test-00000-of-00001.parquet")
        )
    )
    (broken / "data" / "tiny000.mp4").write_bytes((videomme_root / "data" / "tiny000.mp4").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"1 videos missing .*tiny001"):
        run_videomme(loaded, family, broken, tmp_path / "out", loaded.model_dir, broken / "videomme" / "q.jsonl")
    results = run_videomme(
        loaded,
        family,
        broken,
        tmp_path / "out",
        loaded.model_dir,
        broken / "videomme" / "q.jsonl",
        (False,),
        max_new_tokens=1,
        skip_missing_videos=True,
    )
    assert (results["videos_missing"], results["questions_skipped"]) == (1, 2)
    assert results["without_subtitles"]["questions"] == 2
    submission = json.loads((tmp_path / "out" / "submission_without_subtitles.json").read_text())
    assert [(v["videoID"], v["missing"]) for v in submission] == [("tiny000", False), ("tiny001", True)]
    assert [q["response"] for q in submission[1]["questions"]] == ["", ""]  # unanswered to the scorer


def test_command_line_prints_the_duration_table_and_names_a_settings_change(
    tiny_qwen_dir, videomme_root, tmp_path, monkeypatch, capsys
):
    spec = importlib.util.spec_from_file_location("evaluate", Path(__file__).resolve().parents[2] / "tools/evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    argv = ["evaluate", "videomme", "--checkpoint", str(tiny_qwen_dir), "--device", "cpu", "--dtype", "fp32"]
    argv += ["--output", str(tmp_path), "--root", str(videomme_root), "--max-frames", "4", "--subtitles", "without"]
    monkeypatch.setattr(sys, "argv", [*argv, "--max-new-tokens", "1", "--extraction", "lmms-eval"])
    assert evaluate.main() == 0
    out = capsys.readouterr().out
    assert "extraction lmms-eval" in out
    table = out[out.index("duration") :].splitlines()
    assert [line.split()[0] for line in table[:5]] == ["duration", "short", "medium", "long", "overall"]
    assert json.loads((tmp_path / "results.json").read_text())["extraction"]["name"] == "lmms-eval"
    monkeypatch.setattr(sys, "argv", [*argv, "--max-new-tokens", "2"])
    assert evaluate.main() == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "max_new_tokens (1 -> 2)" in err[0] and "--on-settings-change new-file" in err[0]


def test_reading_answers_changes_nothing_so_every_rank_reads_alike(tmp_path):
    """Under torchrun every rank reads ``answers.jsonl`` and must decide alike, while rank 0
    alone cuts a torn line or moves the file aside (after a barrier): ``read_answers`` only
    reads, ``tidy_answers`` acts on its report."""
    settings = {"max_new_tokens": 8}
    path = tmp_path / "answers.jsonl"
    row = {"question_id": "001-1", "subtitles": False, "response": "A", "settings": settings}
    text = json.dumps(row) + '\n{"question_id": "001-2", "subt'
    path.write_text(text)
    done, report = read_answers(path, settings)
    assert path.read_text() == text and list(done) == [("001-1", False)] and report["torn_last_line_dropped"] == 1
    tidy_answers(path, report)
    assert path.read_text() == json.dumps(row) + "\n"
    done, report = read_answers(path, {"max_new_tokens": 16}, on_settings_change="new-file")
    assert done == {} and path.is_file() and report["moved_to"] == str(tmp_path / "answers.1.jsonl")
    tidy_answers(path, report)
    assert not path.exists() and (tmp_path / "answers.1.jsonl").read_text() == json.dumps(row) + "\n"
