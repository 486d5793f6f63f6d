"""Video-MME's answer extraction, scores and results format.

Oracles: the scorer Video-MME's README links, ``thanku-all/parse_answer``
``eval_your_results.py`` at afd52cfe3dde5b3685e0d4f760c10c756860c758 ("official"), and the
benchmark's first scorer, ``BradyFU/Video-MME`` ``evaluation/eval_your_results.py`` at
4e7566d36f63121fc72f040654d6f38f83f30125, whose rules lmms-eval's ``videomme`` task keeps
("lmms-eval"); the results format of ``BradyFU/Video-MME``
``evaluation/output_test_template.json``. Each case below restates one of their rules."""

import pytest

from omnilong.eval.videomme_scoring import (
    EXTRACTIONS,
    duration_table,
    extract_answer,
    get_extraction,
    official_results,
    summarize,
)


@pytest.mark.parametrize(
    "response, official, lmms_eval",
    [
        # both: strip, remove the answer phrases, then the first capital A-D anywhere
        ("A", "A", "A"),
        ("  C.  ", "C", "C"),
        ("The best answer is B", "B", "B"),
        ("The correct answer is: D", "D", "D"),
        ("The answer is (C) because the square is blue.", "C", "C"),
        ("(B) a dog runs across the field", "B", "B"),
        ("I think it is D, the yellow square.", "D", "D"),
        # official only (parse_answer afd52cf added these four phrases): "Answer:", "Option:",
        # "The correct answer", "The correct option"; the first scorer reads the A of "Answer"
        ("Answer: C", "C", "A"),
        ("Answer: D", "D", "A"),
        ("The correct option: B", "B", "B"),
        # both lists join "Best answer:" "Best option:" (a missing comma): "Best option:" alone
        # stays, and its B is the first letter
        ("Best option: A", "B", "B"),
        ("Best answer:Best option: D", "D", "D"),
        # "The best option is" "The correct option is" are likewise one phrase, so the first
        # scorer keeps "The correct option is" (no capital A-D in it: the D still wins)
        ("The correct option is D", "D", "D"),
        # a letter inside a longer word counts: the C of "Correct" (both), once "Answer:" is gone
        ("Correct Answer: B", "C", "C"),
        # unanswered: no capital A-D left (the "over 10 words and no letter" rule is inside this)
        ("the square is red", "", ""),
        ("it moves from the left side of the frame to the right side, slowly and steadily", "", ""),
        ("", "", ""),
    ],
)
def test_extraction_rules_of_each_scorer(response, official, lmms_eval):
    assert extract_answer(response) == official  # the default is the linked scorer
    assert extract_answer(response, "official") == official
    assert extract_answer(response, "lmms-eval") == lmms_eval


def test_each_extraction_names_its_scorer_and_commit():
    assert "afd52cfe3dde5b3685e0d4f760c10c756860c758" in EXTRACTIONS["official"].source
    assert "4e7566d36f63121fc72f040654d6f38f83f30125" in EXTRACTIONS["lmms-eval"].source
    with pytest.raises(ValueError, match=r"unknown Video-MME extraction 'gpt'.*\['lmms-eval', 'official'\]"):
        get_extraction("gpt")


def _row(response, answer, duration, domain, sub_category, task_type, question_id="q"):
    return {
        "question_id": question_id,
        "response": response,
        "answer": answer,
        "duration": duration,
        "domain": domain,
        "sub_category": sub_category,
        "task_type": task_type,
    }


ROWS = [
    _row("A", "A", "short", "Knowledge", "Technology", "OCR Problems"),
    _row("B", "A", "short", "Knowledge", "Geography", "OCR Problems"),
    _row("no idea", "C", "long", "Sports Competition", "Football", "Counting Problem"),
    _row("Answer: D", "D", "medium", "Knowledge", "Technology", "Counting Problem"),
]


def test_scores_over_answered_and_over_all_by_group():
    """The scorer: a question counts only when its extraction is not empty ("answered"), its
    score is correct / answered per duration, domain, sub-category and task type; lmms-eval
    divides by all questions (``accuracy_all``)."""
    summary = summarize(ROWS)
    assert (summary["questions"], summary["answered"], summary["correct"]) == (4, 3, 2)
    assert summary["score"] == pytest.approx(200 / 3)
    assert summary["accuracy_all"] == pytest.approx(50.0)
    assert list(summary["by_duration"]) == ["short", "medium", "long"]
    assert summary["by_duration"]["long"] == {
        "questions": 1,
        "answered": 0,
        "correct": 0,
        "score": 0.0,
        "accuracy_all": 0.0,
    }
    assert summary["by_domain"]["Knowledge"]["score"] == pytest.approx(200 / 3)
    assert summary["by_sub_category"]["Technology"] == {
        "questions": 2,
        "answered": 2,
        "correct": 2,
        "score": 100.0,
        "accuracy_all": 100.0,
    }
    assert summary["by_sub_category"]["Geography"]["score"] == 0.0
    assert summary["by_task_type"]["Counting Problem"]["accuracy_all"] == pytest.approx(50.0)


def test_scores_come_from_the_responses_under_the_chosen_extraction():
    """A stored letter is never trusted: "Answer: D" is D (right) officially, A (wrong) under
    the first scorer's rules."""
    stale = [{**r, "extracted": "A"} for r in ROWS]
    assert summarize(stale, "official")["correct"] == 2
    assert summarize(stale, "lmms-eval")["correct"] == 1
    assert summarize(stale, "lmms-eval")["by_sub_category"]["Technology"]["correct"] == 1


def _questions():
    base = {"question": "?", "options": ["A. a", "B. b", "C. c", "D. d"], "answer": "B", "domain": "Knowledge"}
    return [
        {**base, "video_id": "001", "videoID": "yt1", "duration": "short", "sub_category": "Technology",
         "question_id": "001-1", "task_type": "OCR Problems"},
        {**base, "video_id": "001", "videoID": "yt1", "duration": "short", "sub_category": "Technology",
         "question_id": "001-2", "task_type": "Counting Problem"},
        {**base, "video_id": "002", "videoID": "yt2", "duration": "long", "sub_category": "Law",
         "question_id": "002-1", "task_type": "OCR Problems"},
    ]  # fmt: skip


def _score_as_the_scorer_reads(results: list[dict], extraction: str) -> dict[str, float]:
    """Correct / answered per duration, reading only the fields where the scorer reads them:
    per video ``duration``, ``domain``, ``sub_category``, ``missing`` (skip_missing) and
    ``questions``; per question ``task_type``, ``answer`` and ``response``."""
    tally: dict[str, list[int]] = {}
    for video in results:
        if video["missing"]:
            continue
        assert isinstance(video["domain"], str) and isinstance(video["sub_category"], str)
        for q in video["questions"]:
            assert isinstance(q["task_type"], str)
            letter = extract_answer(q["response"], extraction)
            if letter:
                counts = tally.setdefault(video["duration"], [0, 0])
                counts[0] += letter == q["answer"]
                counts[1] += 1
    return {d: 100.0 * c / n for d, (c, n) in tally.items()}


def test_results_format_is_the_template_s_and_scores_as_summarize():
    questions = _questions()
    responses = {"001-1": "B", "001-2": "Answer: C"}  # 002-1: its video is missing
    results = official_results(questions, responses, missing_videos=["yt2"])
    assert [v["video_id"] for v in results] == ["001", "002"]
    assert results[0] == {
        "video_id": "001",
        "videoID": "yt1",
        "duration": "short",
        "domain": "Knowledge",
        "sub_category": "Technology",
        "missing": False,
        "questions": [
            {
                "question_id": "001-1",
                "task_type": "OCR Problems",
                "question": "?",
                "options": ["A. a", "B. b", "C. c", "D. d"],
                "answer": "B",
                "response": "B",
            },
            {
                "question_id": "001-2",
                "task_type": "Counting Problem",
                "question": "?",
                "options": ["A. a", "B. b", "C. c", "D. d"],
                "answer": "B",
                "response": "Answer: C",
            },
        ],
    }
    assert results[1]["missing"] is True and results[1]["questions"][0]["response"] == ""
    rows = [{**q, "response": responses[q["question_id"]]} for q in questions if q["question_id"] in responses]
    for extraction in EXTRACTIONS:
        assert _score_as_the_scorer_reads(results, extraction) == {
            "short": summarize(rows, extraction)["by_duration"]["short"]["score"]
        }


def test_duration_table_has_a_row_per_duration_and_overall():
    results = {"without_subtitles": summarize(ROWS), "with_subtitles": summarize(ROWS[:2])}
    lines = duration_table(results).splitlines()
    assert lines[0].split() == ["duration", "without", "subtitles", "with", "subtitles"]
    assert [line.split()[0] for line in lines[1:]] == ["short", "medium", "long", "overall"]
    assert lines[1].split()[1:] == ["50.0", "(1/2", "of", "2)", "50.0", "(1/2", "of", "2)"]
    assert lines[3].split()[1:] == ["-", "(0/0", "of", "1)", "-"]  # none answered; no long question with subtitles
    assert lines[4].split()[1:3] == ["66.7", "(2/3"]
