"""Video-MME from a local copy of the official release.

Expected layout of ``root`` (as the Hugging Face release ``lmms-lab/Video-MME`` unpacks)::

    root/videomme/test-00000-of-00001.parquet   questions (any .parquet / .jsonl / .json given
                                                as `questions` works too)
    root/data/<videoID>.mp4                     videos (.MP4 and .mkv are found too)
    root/subtitle/<videoID>.srt                 subtitles (optional; only for the with-subtitles run)

A question record has ``videoID``, ``question_id``, ``duration`` (short / medium / long),
``domain``, ``task_type``, ``question``, ``options`` (``["A. ...", "B. ...", ...]``) and
``answer`` (a letter), and in the release also ``video_id`` ("001") and ``sub_category``
(kept when present); records that nest their questions under ``questions`` are flattened.

Frames are sampled as configured: ``num_frames`` evenly over the video, or ``fps`` with at
most ``max_frames`` (the family's video options; pixel limits from the model's processor).
With subtitles, only the subtitle lines shown at a sampled frame's time are kept (a line
shown from ``start`` to ``end`` is kept iff some frame time ``t`` has ``start <= t < end``;
frame ``k`` is at ``k / rate`` seconds from the start), in order. The prompt is the
benchmark's: the subtitles first (when asked), the instruction, the question, its options and
"The best answer is:"; the answer is greedy, at most ``max_new_tokens`` tokens, and scored by
:mod:`omnilong.eval.videomme_scoring`.

Resumable: each answer (its raw response and the run settings it was made with: frame
sampling, pixel limits, ``max_new_tokens`` and the checkpoint's fingerprint) is appended to
``answers.jsonl`` as soon as it is made; a rerun reuses the ``(question_id, subtitles)`` pairs
there only when their settings equal this run's. Otherwise it refuses, naming each setting that
differs, or (``on_settings_change="new-file"``) moves the old file aside to
``answers.<n>.jsonl`` and starts a new one. A torn last line (the run stopped while writing it)
is dropped, counted in ``results.json`` and made again.

``results.json`` has the extraction used and the run settings and, per setting (without / with
subtitles), the official score and the accuracy over all questions, overall and by duration,
domain, sub-category and task type (:mod:`omnilong.eval.videomme_scoring`); responses are read
again with the chosen extraction on every run, so changing it re-scores the stored ones.
``submission_without_subtitles.json`` / ``submission_with_subtitles.json`` hold the answers in
the benchmark's results format, which its scorer reads
(:func:`~omnilong.eval.videomme_scoring.official_results`).
"""

import hashlib
import itertools
import json
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
from omnilong.eval.videomme_scoring import DEFAULT_EXTRACTION, get_extraction, official_results, summarize
from omnilong.generation.loading import InferenceModel, describe_checkpoint
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
_OPTIONAL_FIELDS = ("video_id", "sub_category")
ON_SETTINGS_CHANGE = ("refuse", "new-file")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp")
_CONFIG_NAMES = ("config.json", "config.yaml", ".metadata")  # the architecture, a run's config, DCP's index
_FINGERPRINT_BYTES = 1 << 16
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
            questions.append({f: row[f] for f in (*_FIELDS, *_OPTIONAL_FIELDS) if f in row})
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


def checkpoint_fingerprint(checkpoint: Path) -> str:
    """The first 16 hex digits of a sha256 over the weight and config files of ``checkpoint``
    (a Hugging Face directory, or a step folder and its base model's ``config.json``): each
    file's name, size and first and last 64 KiB. Equal for a copy of the same checkpoint; a
    retrained or reconverted one differs (its weights' bytes do) without reading the gigabytes
    of it. Tokenizer files are not part of it.

    Raises:
        FileNotFoundError: not a checkpoint (:func:`describe_checkpoint`).
    """
    model_dir, _, step_dir = describe_checkpoint(checkpoint)
    files = [model_dir / "config.json"]
    files += sorted(
        f
        for f in (step_dir or model_dir).iterdir()
        if f.is_file() and (f.name.endswith(_WEIGHT_SUFFIXES) or f.name in _CONFIG_NAMES)
    )
    digest = hashlib.sha256()
    for path in dict.fromkeys(files):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            digest.update(f.read(_FINGERPRINT_BYTES))
            f.seek(max(size - _FINGERPRINT_BYTES, 0))
            digest.update(f.read(_FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]


def run_settings(family: ModelFamily, num_frames: int | None, max_new_tokens: int, checkpoint: Path) -> dict[str, Any]:
    """What an answer depends on besides its question and subtitle setting: the frame sampling
    (``num_frames`` evenly, or ``fps`` with at most ``max_frames``), the pixel limits, the
    answer's length limit and the checkpoint (:func:`checkpoint_fingerprint`)."""
    options = family.video_options
    return {
        "num_frames": num_frames,
        "fps": None if num_frames is not None else options.fps,
        "max_frames": None if num_frames is not None else options.max_frames,
        "min_pixels": options.min_pixels,
        "max_pixels": options.max_pixels,
        "total_pixels": options.total_pixels,
        "max_new_tokens": max_new_tokens,
        "checkpoint": checkpoint_fingerprint(checkpoint),
    }


def _settings_differences(rows: list[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    """``"key (recorded -> now)"`` of each setting some row was made with otherwise (the first
    such row's value; for the checkpoint also the path it was recorded at), and one entry for
    rows from before settings were recorded."""
    changed: dict[str, str] = {}
    for row in rows:
        recorded = row.get("settings")
        if recorded is None:
            changed.setdefault("settings", "settings (not recorded: written before OmniLong recorded them)")
            continue
        for key in sorted(set(recorded) | set(settings)):
            if recorded.get(key) != settings.get(key):
                at = f" at {row.get('checkpoint_path')}" if key == "checkpoint" else ""
                changed.setdefault(
                    key, f"{key} ({recorded.get(key, '<unset>')!r}{at} -> {settings.get(key, '<unset>')!r})"
                )
    return list(changed.values())


def read_answers(
    path: Path, settings: dict[str, Any], on_settings_change: str = "refuse"
) -> tuple[dict[tuple[str, bool], dict[str, Any]], dict[str, Any]]:
    """The answers of ``path`` to reuse, keyed by ``(question_id, subtitles)``, and what reading
    them found: ``{"reused", "torn_last_line_dropped", "moved_to"}``. Reads only (every rank
    reads alike and so decides alike); :func:`tidy_answers` then acts on the report.

    A torn last line is dropped. Answers made with other ``settings`` are not reused:
    ``on_settings_change`` ``"refuse"`` raises; ``"new-file"`` names the file
    ``answers.<n>.jsonl`` (the first free ``n``) the old one is to be moved to, and nothing is
    reused.

    Raises:
        ValueError: answers made with other settings and ``on_settings_change="refuse"``
            (names each setting that differs and both ways out); an unknown
            ``on_settings_change``; a line before the last that is not JSON.
    """
    if on_settings_change not in ON_SETTINGS_CHANGE:
        raise ValueError(f"on_settings_change must be one of {ON_SETTINGS_CHANGE}, not {on_settings_change!r}")
    report = {"reused": 0, "torn_last_line_dropped": 0, "moved_to": None}
    if not path.is_file():
        return {}, report
    lines = sum(1 for line in path.read_bytes().split(b"\n") if line.strip())
    rows = read_appended_jsonl(path, repair=False)
    report["torn_last_line_dropped"] = lines - len(rows)
    changed = _settings_differences(rows, settings)
    if changed and on_settings_change == "refuse":
        raise ValueError(
            f"{path}: its {len(rows)} answers were made with other settings than this run's: "
            f"{', '.join(changed)}; rerun with those settings, pass --on-settings-change new-file "
            "to start a new answers file (the old one is kept as answers.<n>.jsonl), or use another --output"
        )
    if changed:
        moved = next(m for n in itertools.count(1) if not (m := path.with_name(f"answers.{n}.jsonl")).exists())
        logger.warning("%s: answers made with other settings (%s): moved to %s", path, ", ".join(changed), moved.name)
        report["moved_to"] = str(moved)
        return {}, report
    done = {(row["question_id"], row["subtitles"]): row for row in rows}
    report["reused"] = len(done)
    return done, report


def tidy_answers(path: Path, report: dict[str, Any]) -> None:
    """Act on :func:`read_answers`' ``report`` (by the one writing process, once every rank has
    read): move the file to ``report["moved_to"]``, or cut its torn last line, so that new
    answers are appended after whole lines."""
    if report["moved_to"] is not None:
        path.rename(report["moved_to"])
    elif report["torn_last_line_dropped"]:
        read_appended_jsonl(path, repair=True)


def run_videomme(
    loaded: InferenceModel,
    family: ModelFamily,
    root: Path,
    output_dir: Path,
    checkpoint: Path,
    questions_file: Path | None = None,
    subtitle_settings: Sequence[bool] = (False, True),
    num_frames: int | None = None,
    max_new_tokens: int = 8,
    limit: int | None = None,
    skip_missing_videos: bool = False,
    extraction: str = DEFAULT_EXTRACTION,
    on_settings_change: str = "refuse",
) -> dict[str, Any]:
    """Answer every question (per subtitle setting), resuming from ``output_dir/answers.jsonl``
    (:func:`read_answers`), and write ``output_dir/results.json`` and the results-format files
    (module docstring).

    Args:
        checkpoint: the path ``loaded`` was loaded from (a step folder or a Hugging Face
            directory): its fingerprint is recorded with every answer.
        extraction: how letters are read from the responses (a name of
            :data:`~omnilong.eval.videomme_scoring.EXTRACTIONS`).
        on_settings_change: ``"refuse"`` or ``"new-file"`` (:func:`read_answers`).

    Raises:
        FileNotFoundError: missing videos (all named up to 10), unless ``skip_missing_videos``
            (then they are counted in ``results.json``).
        ValueError: an unknown extraction; answers made with other settings
            (:func:`read_answers`).
    """
    chosen = get_extraction(extraction)
    questions, videos = read_inputs(root, questions_file, limit, skip_missing_videos)
    missing = sorted(v for v, p in videos.items() if p is None)
    settings = run_settings(family, num_frames, max_new_tokens, checkpoint)
    answers_path = output_dir / "answers.jsonl"
    answers = GroupResults(loaded, answers_path, resume=True)  # leftover part files folded in
    done, answers_report = read_answers(answers_path, settings, on_settings_change)  # every rank alike
    answers.barrier()  # every rank has read the file before rank 0 cuts or moves it
    if loaded.is_main:
        tidy_answers(answers_path, answers_report)
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
                "settings": settings,
                "checkpoint_path": str(checkpoint),
            }
            answers.write(row)
    for row in answers.finish():  # every group's answers
        done[(row["question_id"], row["subtitles"])] = row
    results = {
        "evaluation": "videomme",
        "extraction": {"name": chosen.name, "source": chosen.source},
        "settings": settings,
        "checkpoint": str(checkpoint),
        "questions": len(questions),
        "videos_missing": len(missing),
        "questions_skipped": sum(videos[q["videoID"]] is None for q in questions),
        "answers_file": answers_report,
    }
    for with_subs in subtitle_settings:
        name = "with_subtitles" if with_subs else "without_subtitles"
        rows = [done[key] for q in questions if (key := (q["question_id"], with_subs)) in done]
        results[name] = summarize(rows, chosen.name)
        results[name]["submission"] = f"submission_{name}.json"
        if loaded.is_main:
            responses = {r["question_id"]: r["response"] for r in rows}
            submission = official_results(questions, responses, missing)
            (output_dir / f"submission_{name}.json").write_text(json.dumps(submission, indent=2) + "\n")
    if loaded.is_main:
        write_json(output_dir / "results.json", results)
    return results
