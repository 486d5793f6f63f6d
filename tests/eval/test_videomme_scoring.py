"""Video-MME's official answer extraction and scores (oracle: the rules of the benchmark's
scorer, restated in omnilong/eval/videomme_scoring.py)."""

import pytest

from omnilong.eval.videomme_scoring import extract_answer, summarize


@pytest.mark.parametrize(
    "response, letter",
    [
        ("A", "A"),
        ("  C.  ", "C"),
        ("The best answer is B", "B"),
        ("The correct answer is: D", "D"),
        ("The answer is (C) because the square is blue.", "C"),
        ("Best option: A", "A"),
        ("(B) a dog runs across the field", "B"),
        ("I think it is D, the yellow square.", "D"),
        ("Answer: C", "A"),  # "Answer:" is no official phrase: the A of "Answer" is the first letter
        ("the square is red", ""),  # no capital A-D
        ("it moves from the left side of the frame to the right side, slowly and steadily", ""),  # > 10 words
        ("", ""),
    ],
)
def test_official_extraction(response, letter):
    assert extract_answer(response) == letter


def test_scores_over_answered_and_over_all_by_group():
    rows = [
        {"extracted": "A", "answer": "A", "duration": "short", "domain": "Knowledge", "task_type": "OCR Problems"},
        {"extracted": "B", "answer": "A", "duration": "short", "domain": "Knowledge", "task_type": "OCR Problems"},
        {
            "extracted": "",
            "answer": "C",
            "duration": "long",
            "domain": "Sports Competition",
            "task_type": "Counting Problem",
        },
        {"extracted": "D", "answer": "D", "duration": "medium", "domain": "Knowledge", "task_type": "Counting Problem"},
    ]
    summary = summarize(rows)
    assert (summary["questions"], summary["answered"], summary["correct"]) == (4, 3, 2)
    assert summary["score"] == pytest.approx(200 / 3)  # official: over answered
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
    assert summary["by_task_type"]["Counting Problem"]["accuracy_all"] == pytest.approx(50.0)
