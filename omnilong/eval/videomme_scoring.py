"""Video-MME's official answer extraction and scores.

Extraction (the rules of the benchmark's own scorer, ``eval_your_results.py``, and of
lmms-eval's ``videomme`` task): strip the response; remove every occurrence of the answer
phrases "The best answer is", "The correct answer is", "The answer is", "The answer",
"The best option is", "The correct option is", "Best answer:", "Best option:"; a response of
more than 10 words with no capital A-D left is unanswered; otherwise the answer is the first
capital A, B, C or D anywhere in what is left (so "(B) a dog" gives B, and a letter inside a
longer word counts too: "Answer: C" gives A, as the official scorer does); none: unanswered.

Scores: the official score is the accuracy over *answered* questions (an empty extraction is
left out); the accuracy over *all* questions counts it as wrong. Both are given overall and
by duration (short / medium / long), domain and task type.
"""

import re
from collections.abc import Iterable
from typing import Any

ANSWER_PHRASES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
)
_LETTER = re.compile(r"[ABCD]")
DURATIONS = ("short", "medium", "long")


def extract_answer(response: str) -> str:
    """The option letter of a response by the official rules (module docstring); ``""`` when
    the response answers nothing."""
    text = response.strip()
    for phrase in ANSWER_PHRASES:
        text = text.replace(phrase, "")
    match = _LETTER.search(text)
    if match is None:
        return ""  # covers the official "over 10 words and no letter" rule as well
    return match.group(0)


def _accuracy(rows: list[dict]) -> dict[str, Any]:
    answered = [r for r in rows if r["extracted"]]
    correct = sum(r["extracted"] == r["answer"] for r in answered)
    return {
        "questions": len(rows),
        "answered": len(answered),
        "correct": correct,
        "score": 100.0 * correct / len(answered) if answered else 0.0,  # official: over answered
        "accuracy_all": 100.0 * correct / len(rows) if rows else 0.0,
    }


def summarize(rows: Iterable[dict]) -> dict[str, Any]:
    """Scores of answered rows (``extracted``, ``answer``, ``duration``, ``domain``, ``task_type``):
    overall and by duration, domain and task type."""
    rows = list(rows)
    summary = _accuracy(rows)
    for key in ("duration", "domain", "task_type"):
        groups: dict[str, list[dict]] = {}
        for row in rows:
            groups.setdefault(str(row.get(key)), []).append(row)
        order = (
            [d for d in DURATIONS if d in groups] + sorted(set(groups) - set(DURATIONS))
            if key == "duration"
            else sorted(groups)
        )
        summary[f"by_{key}"] = {name: _accuracy(groups[name]) for name in order}
    return summary
