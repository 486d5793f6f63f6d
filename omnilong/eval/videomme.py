"""Video-MME from a local copy of the official release.

Expected layout of ``root`` (as the Hugging Face release ``lmms-lab/Video-MME`` unpacks)::

    root/videomme/test-00000-of-00001.parquet   questions (any .parquet / .jsonl / .json given
                                                as `questions` works too)
    root/data/<videoID>.mp4                     videos (.MP4 and .mkv are found too)
    root/subtitle/<videoID>.srt                 subtitles (optional; only for the with-subtitles run)

A question record has ``videoID``, ``question_id``, ``duration`` (short / medium / long),
``domain``, ``task_type``, ``question``, ``options`` (``["A. ...", "B. ...", ...]``) and
``answer`` (a letter); records that nest their questions under ``questions`` are flattened.

Frames are sampled as configured: ``num_frames`` evenly over the video, or ``fps`` with at
most ``max_frames`` (the family's video options; pixel limits from the model's processor).
With subtitles, only the subtitle lines shown at a sampled frame's time are kept (a line
shown from ``start`` to ``end`` is kept iff some frame time ``t`` has ``start <= t < end``;
frame ``k`` is at ``k / rate`` seconds from the start), in order. The prompt is the
benchmark's: the subtitles first (when asked), the instruction, the question, its options and
"The best answer is:"; the answer is greedy, at most ``max_new_tokens`` tokens, and scored by
:mod:`omnilong.eval.videomme_scoring`.

Resumable: each answer is appended to ``answers.jsonl`` as soon as it is made, and a rerun
skips the ``(question_id, subtitles)`` pairs already there. ``results.json`` has, per setting
(without / with subtitles), the official score (accuracy over answered questions) and the
accuracy over all questions, overall and by duration, domain and task type.
"""

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omnilong.data.sources import read_records
from omnilong.data.video import DecodedVideo, decode_video
from omnilong.eval.ask import generate_answer
from omnilong.eval.family import ModelFamily, Prompt
from omnilong.eval.groups import GroupResults
from omnilong.eval.report import write_json
from omnilong.eval.videomme_scoring import extract_answer, summarize
from omnilong.generation.loading import InferenceModel
from omnilong.jsonl import read_appended_jsonl

logger = logging.getLogger(__name__)

INSTRUCTION = (
    "Select the best answer to the following multiple-choice question based on the video{and_subs}. "
    "Respond with only the letter (A, B, C, or D) of the correct option."
)
SUBTITLES_INTRO = "This video's subtitles are listed below:"
NO_SUBTITLES = "No subtitles available"
ANSWER_CUE = "The best answer is:"
_FIELDS = ("videoID", "question_id", "duration", "domain", "task_type", "question", "options", "answer")
_VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv")
_TIME = re.compile(r"(\d+):(\d+):(\d+)[,.](\d+)")
_TAG = re.compile(r"<[^>]+>")


def default_questions_file(root: Path) -> Path:
    """``root/videomme/*.parquet`` (the release's questions).

    Raises:
        FileNotFoundError: none there (pass the questions file explicitly).
    """
    found = sorted((root / "videomme").glob("*.parquet"))
    if not found:
        raise FileNotFoundError(
            f"no questions under {root}/videomme/*.parquet: pass questions=<file> (.parquet, .jsonl or .json)"
        )
    return found[0]


def read_questions(path: Path) -> list[dict[str, Any]]:
    """The question records of ``path``, nested ``questions`` lists flattened.

    Raises:
        ValueError: a record without one of the fields Video-MME questions have, or whose
            ``videoID`` is not a plain file name (a path could name a file outside the data
            directory) (names it).
    """
    questions = []
    for origin, record in read_records(path):
        nested = record.get("questions") if isinstance(record, dict) else None
        for row in [{**record, **q} for q in nested] if isinstance(nested, list) else [record]:
            if "videoID" not in row and "video_id" in row:
                row = {**row, "videoID": row["video_id"]}
            missing = [f for f in _FIELDS if f not in row]
            if missing:
                raise ValueError(f"{origin}: a Video-MME question needs {missing}")
            video_id = row["videoID"]
            if not isinstance(video_id, str) or Path(video_id).name != video_id or video_id in ("", ".", ".."):
                raise ValueError(
                    f"{origin}: videoID {video_id!r} is not a file name (videos are read from <root>/data only)"
                )
            questions.append({f: row[f] for f in _FIELDS})
    return questions


def find_video(root: Path, video_id: str) -> Path | None:
    """``root/data/<video_id>`` with a known suffix, or ``None``."""
    return next((p for s in _VIDEO_SUFFIXES if (p := root / "data" / f"{video_id}{s}").is_file()), None)


def _seconds(stamp: str) -> float:
    h, m, s, ms = _TIME.match(stamp.strip()).groups()
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 10 ** len(ms)


def read_subtitles(path: Path) -> list[tuple[float, float, str]]:
    """``(start, end, text)`` of every cue of an SRT file, markup tags removed, in order.

    Raises:
        ValueError: a cue whose time line is malformed (names the file).
    """
    cues = []
    for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8-sig").replace("\r\n", "\n").strip()):
        lines = block.split("\n")
        arrow = next((i for i, line in enumerate(lines) if "-->" in line), None)
        if arrow is None:
            continue
        start, _, end = lines[arrow].partition("-->")
        if not (_TIME.match(start.strip()) and _TIME.match(end.strip())):
            raise ValueError(f"{path}: malformed subtitle time line {lines[arrow]!r}")
        text = " ".join(_TAG.sub("", line).strip() for line in lines[arrow + 1 :]).strip()
        if text:
            cues.append((_seconds(start), _seconds(end), text))
    return cues


def subtitles_at(cues: Sequence[tuple[float, float, str]], times: Sequence[float]) -> list[str]:
    """The texts of the cues shown at any of ``times`` (``start <= t < end``), in cue order."""
    return [text for start, end, text in cues if any(start <= t < end for t in times)]


def build_prompt_text(question: dict[str, Any], subtitles: list[str] | None) -> str:
    """The benchmark's prompt; ``subtitles`` ``None``: the without-subtitles setting."""
    body = "\n".join(
        [
            INSTRUCTION.format(and_subs="" if subtitles is None else " and the subtitles"),
            question["question"],
            *question["options"],
            ANSWER_CUE,
        ]
    )
    if subtitles is None:
        return body
    return f"{SUBTITLES_INTRO}\n{chr(10).join(subtitles) if subtitles else NO_SUBTITLES}\n{body}"


def _decode(path: Path, family: ModelFamily, num_frames: int | None) -> DecodedVideo:
    """Frames evenly spread (``num_frames``) or at the family's fps (at most its max_frames)."""
    options = family.video_options
    if num_frames is not None:
        return decode_video(path, fps=1e6, max_frames=num_frames)  # the rate is then num_frames / duration
    return decode_video(path, options.fps, options.max_frames)


def read_inputs(
    root: Path, questions_file: Path | None = None, limit: int | None = None, skip_missing_videos: bool = False
) -> tuple[list[dict[str, Any]], dict[str, Path | None]]:
    """The questions (the first ``limit``) and each ``videoID``'s file (``None``: missing): what
    :func:`run_videomme` reads first, and what ``tools/evaluate.py`` checks before loading a model.

    Raises:
        FileNotFoundError: no questions file, or missing videos (all named up to 10), unless
            ``skip_missing_videos``.
        ValueError: a malformed question (:func:`read_questions`).
    """
    questions = read_questions(questions_file or default_questions_file(root))[:limit]
    videos = {q["videoID"]: find_video(root, q["videoID"]) for q in questions}
    missing = sorted(v for v, p in videos.items() if p is None)
    if missing and not skip_missing_videos:
        raise FileNotFoundError(
            f"{len(missing)} videos missing under {root}/data (e.g. {missing[:10]}): download "
            "them, or pass skip_missing_videos to score without them (they are counted)"
        )
    return questions, videos


def run_videomme(
    loaded: InferenceModel,
    family: ModelFamily,
    root: Path,
    output_dir: Path,
    questions_file: Path | None = None,
    subtitle_settings: Sequence[bool] = (False, True),
    num_frames: int | None = None,
    max_new_tokens: int = 8,
    limit: int | None = None,
    skip_missing_videos: bool = False,
) -> dict[str, Any]:
    """Answer every question (per subtitle setting), resuming from ``output_dir/answers.jsonl``,
    and write ``output_dir/results.json``.

    Raises:
        FileNotFoundError: missing videos (all named up to 10), unless ``skip_missing_videos``
            (then they are counted in ``results.json``).
    """
    questions, videos = read_inputs(root, questions_file, limit, skip_missing_videos)
    missing = sorted(v for v, p in videos.items() if p is None)
    answers_path = output_dir / "answers.jsonl"
    answers = GroupResults(loaded, answers_path, resume=True)
    done = {}
    if answers_path.is_file():  # a torn last answer (the run stopped while writing it) is dropped and made again
        for row in read_appended_jsonl(answers_path, repair=loaded.is_main):
            done[(row["question_id"], row["subtitles"])] = row
    todo = [
        (q, s)
        for q in questions
        for s in subtitle_settings
        if videos[q["videoID"]] is not None and (q["question_id"], s) not in done
    ]
    logger.info(
        "Video-MME: %d questions x %d settings, %d answered before, %d to go, %d videos missing",
        len(questions),
        len(subtitle_settings),
        len(done),
        len(todo),
        len(missing),
    )
    decoded: tuple[str | None, Any] = (None, None)
    with family.frame_feature_cache(loaded.model) as cache:
        for question, with_subs in answers.run(todo, "Video-MME", key=lambda item: item[0]["videoID"]):
            video_id = question["videoID"]
            if decoded[0] != video_id:  # questions come grouped by video: decode (and encode) each once
                cache.clear()
                decoded = (video_id, _decode(videos[video_id], family, num_frames))
            video = decoded[1]
            subtitles = None
            if with_subs:
                srt = root / "subtitle" / f"{video_id}.srt"
                times = [k / video.fps for k in range(video.frames.shape[0])]
                subtitles = subtitles_at(read_subtitles(srt), times) if srt.is_file() else []
            steps = -(-video.frames.shape[0] // family.frames_per_step)
            cache.expect([(video_id, j) for j in range(steps)])
            response, tokens = generate_answer(
                loaded, family, Prompt(build_prompt_text(question, subtitles), video=video), max_new_tokens
            )
            row = {
                **question,
                "subtitles": with_subs,
                "frames": video.frames.shape[0],
                "tokens": tokens,
                "response": response,
                "extracted": extract_answer(response),
            }
            answers.write(row)
    for row in answers.finish():  # every group's answers
        done[(row["question_id"], row["subtitles"])] = row
    wanted = {(q["question_id"], s) for q in questions for s in subtitle_settings}
    results = {
        "evaluation": "videomme",
        "questions": len(questions),
        "videos_missing": len(missing),
        "questions_skipped": sum(videos[q["videoID"]] is None for q in questions),
    }
    for with_subs in subtitle_settings:
        rows = [r for key, r in done.items() if key in wanted and key[1] == with_subs]
        results["with_subtitles" if with_subs else "without_subtitles"] = summarize(rows)
    if loaded.is_main:
        write_json(output_dir / "results.json", results)
    return results
