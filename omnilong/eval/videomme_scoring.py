"""Video-MME's answer extraction, scores, and its results format.

Extraction (:data:`EXTRACTIONS`, chosen by name). Each strips the response, removes every
occurrence of its answer phrases (case-sensitive, in the order listed), and takes the first
capital A, B, C or D anywhere in what is left; none: unanswered (``""``). The scorers also say
"over 10 words and no letter: unanswered", which that rule already covers. A letter inside a
longer word counts, as in the scorers ("Correct Answer: B" is C under both).

- ``official`` (the default): ``eval_your_results.py`` of ``thanku-all/parse_answer`` at
  commit afd52cfe3dde5b3685e0d4f760c10c756860c758 (2024-06-23), the scorer that Video-MME's
  README links (``BradyFU/Video-MME`` at 8889f313a4b9e9480611d65daa505aab2ef63808). It also
  removes "Answer:", "Option:", "The correct answer" and "The correct option", so
  "Answer: C" is C.
- ``lmms-eval``: the benchmark's first scorer, ``evaluation/eval_your_results.py`` of
  ``BradyFU/Video-MME`` at 4e7566d36f63121fc72f040654d6f38f83f30125 (2024-06-03; removed from
  that repository on 2024-06-18), whose rules lmms-eval's ``videomme`` task keeps
  (``lmms_eval/tasks/videomme/utils.py``); for comparing with numbers scored that way.
  "Answer: C" is A there (the A of "Answer").

Both lists read as their scorers do, where a missing comma joins two phrases into one: "The
best option isThe correct option is" and "Best answer:Best option:" are single phrases, so
neither "The best option is" nor "Best option:" is removed on its own ("Best option: A" is B
under both; OmniLong before issue 26 split them and read A).

Scores: the official score is the accuracy over *answered* questions (an empty extraction is
left out, as the scorer does); ``accuracy_all`` counts it as wrong (lmms-eval's score). Both
are given overall and by duration, domain (the scorer's "video categories"), sub-category and
task type. Extraction always runs on the stored raw responses, so a change of extraction
re-scores them.

Results format (:func:`official_results`): the JSON the scorer reads, as its template
``evaluation/output_test_template.json`` shows: a list with one entry per video (``video_id``,
``duration``, ``domain``, ``sub_category``, ``missing`` (read with the scorer's
``skip_missing``) and ``questions``), each question with ``question_id``, ``task_type``,
``question``, ``options``, ``answer`` and the model's ``response``.
"""

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

DURATIONS = ("short", "medium", "long")
_LETTER = re.compile(r"[ABCD]")


@dataclass(frozen=True)
class Extraction:
    """A rule set for reading the chosen letter out of a response.

    Args:
        name: the name users pass (``--extraction``).
        source: the scorer file and commit it follows.
        phrases: removed from the response in this order, every occurrence, before the
            first A-D is taken.
    """

    name: str
    source: str
    phrases: tuple[str, ...]


_FIRST_RELEASE_PHRASES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is" + "The correct option is",  # one phrase: the scorer's list lacks a comma here
    "Best answer:" + "Best option:",  # likewise
)
EXTRACTIONS = {
    e.name: e
    for e in (
        Extraction(
            "official",
            "thanku-all/parse_answer eval_your_results.py@afd52cfe3dde5b3685e0d4f760c10c756860c758 "
            "(linked from BradyFU/Video-MME README.md@8889f313a4b9e9480611d65daa505aab2ef63808)",
            (*_FIRST_RELEASE_PHRASES, "Answer:", "Option:", "The correct answer", "The correct option"),
        ),
        Extraction(
            "lmms-eval",
            "BradyFU/Video-MME evaluation/eval_your_results.py@4e7566d36f63121fc72f040654d6f38f83f30125 "
            "(the rules of lmms-eval's lmms_eval/tasks/videomme/utils.py)",
            _FIRST_RELEASE_PHRASES,
        ),
    )
}
DEFAULT_EXTRACTION = "official"


def get_extraction(name: str) -> Extraction:
    """The extraction called ``name``.

    Raises:
        ValueError: an unknown name (lists the known ones).
    """
    if name not in EXTRACTIONS:
        raise ValueError(f"unknown Video-MME extraction {name!r}: choose one of {sorted(EXTRACTIONS)}")
    return EXTRACTIONS[name]


def extract_answer(response: str, extraction: str = DEFAULT_EXTRACTION) -> str:
    """The option letter ``response`` chooses under ``extraction`` (module docstring); ``""``
    when it answers nothing."""
    text = response.strip()
    for phrase in get_extraction(extraction).phrases:
        text = text.replace(phrase, "")
    match = _LETTER.search(text)
    return "" if match is None else match.group(0)


def _accuracy(rows: list[dict], letters: list[str]) -> dict[str, Any]:
    answered = [(r, x) for r, x in zip(rows, letters) if x]
    correct = sum(x == r["answer"] for r, x in answered)
    return {
        "questions": len(rows),
        "answered": len(answered),
        "correct": correct,
        "score": 100.0 * correct / len(answered) if answered else 0.0,  # official: over answered
        "accuracy_all": 100.0 * correct / len(rows) if rows else 0.0,
    }


def summarize(rows: Iterable[dict], extraction: str = DEFAULT_EXTRACTION) -> dict[str, Any]:
    """Scores of answer rows (``response``, ``answer``, ``duration``, ``domain``,
    ``sub_category``, ``task_type``; a row without ``sub_category`` is grouped under
    ``"None"``), each response read with ``extraction``: overall and by each of those groups
    (durations in the benchmark's order, the other groups sorted)."""
    rows = list(rows)
    letters = [extract_answer(r["response"], extraction) for r in rows]
    summary = _accuracy(rows, letters)
    for key in ("duration", "domain", "sub_category", "task_type"):
        groups: dict[str, tuple[list[dict], list[str]]] = {}
        for row, letter in zip(rows, letters):
            group = groups.setdefault(str(row.get(key)), ([], []))
            group[0].append(row)
            group[1].append(letter)
        order = sorted(groups)
        if key == "duration":
            order = [d for d in DURATIONS if d in groups] + [g for g in order if g not in DURATIONS]
        summary[f"by_{key}"] = {name: _accuracy(*groups[name]) for name in order}
    return summary


def official_results(
    questions: Sequence[dict], responses: dict[str, str], missing_videos: Iterable[str]
) -> list[dict[str, Any]]:
    """``questions`` in the benchmark's results format (module docstring), videos in the
    order their first question comes. A video's ``duration``, ``domain`` and ``sub_category``
    are its first question's (the scorer keeps them per video, as the release does).

    Args:
        questions: question records (``videoID``, ``question_id``, ``duration``, ``domain``,
            ``task_type``, ``question``, ``options``, ``answer``; ``video_id`` (the release's
            "001") and ``sub_category`` when the questions file has them).
        responses: the raw response per ``question_id``; a question without one gets ``""``
            (unanswered to the scorer).
        missing_videos: the ``videoID`` of videos not found (their entry has ``missing: true``).
    """
    missing = set(missing_videos)
    videos: dict[str, dict[str, Any]] = {}
    for q in questions:
        video = videos.setdefault(
            q["videoID"],
            {
                "video_id": q.get("video_id", q["videoID"]),
                "videoID": q["videoID"],
                "duration": q["duration"],
                "domain": q["domain"],
                "sub_category": q.get("sub_category"),
                "missing": q["videoID"] in missing,
                "questions": [],
            },
        )
        video["questions"].append(
            {
                **{k: q[k] for k in ("question_id", "task_type", "question", "options", "answer")},
                "response": responses.get(q["question_id"], ""),
            }
        )
    return list(videos.values())


def duration_table(results: dict[str, Any]) -> str:
    """The per-duration scores of a Video-MME ``results.json`` as a text table: one row per
    duration and one overall, one column per subtitle setting, each cell
    ``score (correct/answered of questions)``; ``-`` for the score when nothing was answered
    (the official score is over answered questions only)."""
    settings = [s for s in ("without_subtitles", "with_subtitles") if s in results]
    header = ["duration", *(s.replace("_", " ") for s in settings)]

    def cell(scores: dict[str, Any] | None) -> str:
        if scores is None:
            return "-"
        score = f"{scores['score']:.1f}" if scores["answered"] else "-"
        return f"{score} ({scores['correct']}/{scores['answered']} of {scores['questions']})"

    names = [d for d in DURATIONS if any(d in results[s]["by_duration"] for s in settings)]
    names += sorted({d for s in settings for d in results[s]["by_duration"]} - set(DURATIONS))
    table = [header]
    table += [[d, *(cell(results[s]["by_duration"].get(d)) for s in settings)] for d in names]
    table.append(["overall", *(cell(results[s]) for s in settings)])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)
