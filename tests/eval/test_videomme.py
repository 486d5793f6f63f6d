"""Video-MME on a tiny Video-MME-shaped folder (two generated videos, four questions, one
subtitle file) with the tiny random model (each family's for a whole run): data reading,
subtitles at the sampled frames, the official prompt, both subtitle settings, resuming, and
missing videos."""

import json

import pytest

from omnilong.eval.videomme import build_prompt_text, read_questions, read_subtitles, run_videomme, subtitles_at
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


def test_run_writes_scores_and_resumes(family_inference, videomme_root, tmp_path, caplog):
    loaded, family = family_inference
    results = run_videomme(loaded, family, videomme_root, tmp_path, max_new_tokens=2)
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 8  # 4 questions x (without, with subtitles)
    assert {a["subtitles"] for a in answers} == {False, True}
    assert all(a["frames"] <= 4 for a in answers)
    for setting in ("without_subtitles", "with_subtitles"):
        scores = results[setting]
        assert scores["questions"] == 4 and set(scores["by_duration"]) == {"short", "medium", "long"}
        assert scores["correct"] == sum(
            a["extracted"] == a["answer"] for a in answers if a["subtitles"] == (setting == "with_subtitles")
        )
    assert json.loads((tmp_path / "results.json").read_text()) == results

    # A rerun answers only what is missing from answers.jsonl; the last answer, torn in the
    # middle (the run was killed while writing it), is dropped with a warning and made again.
    lines = (tmp_path / "answers.jsonl").read_text().splitlines()
    (tmp_path / "answers.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
    rerun = run_videomme(loaded, family, videomme_root, tmp_path, max_new_tokens=2)
    assert (tmp_path / "answers.jsonl").read_text().splitlines() == lines  # greedy: the same answer again
    assert rerun == results
    assert f"{tmp_path / 'answers.jsonl'}: dropped its torn last line 8" in caplog.text


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
        run_videomme(loaded, family, broken, tmp_path / "out", broken / "videomme" / "q.jsonl")
    results = run_videomme(
        loaded,
        family,
        broken,
        tmp_path / "out",
        broken / "videomme" / "q.jsonl",
        (False,),
        max_new_tokens=1,
        skip_missing_videos=True,
    )
    assert (results["videos_missing"], results["questions_skipped"]) == (1, 2)
    assert results["without_subtitles"]["questions"] == 2
