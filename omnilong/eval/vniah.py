"""Visual needle in a haystack (V-NIAH), as LongVA's ``vision_niah`` evaluation defines it.

LongVA (github.com/EvolvingLMMs-Lab/LongVA, commit f4c8781d, ``vision_niah/``) is the
reference for each rule below:

* **Haystack**: the first N frames of the video sampled at ``fps`` from its start (LongVA's
  ``produce_haystack_embedding.py`` takes every ``round(avg_fps)``-th frame, i.e. 1 fps, and
  ``eval_vision_niah.py`` cuts ``haystack[:num_frames]``). Here the frames shown at
  ``0, 1/fps, 2/fps, ...`` are decoded once for the largest N and each N is a prefix, so the
  same N gives the same haystack whatever the other counts are. A count the video is too short
  for is refused before any work (:func:`check_frame_counts`).
* **Needle position**: the needle goes in before haystack frame ``int(depth * N)``
  (``query_frame_idx`` in ``eval_vision_niah.py``: truncation, not rounding). The needle takes
  the model's whole encoding step (``family.frames_per_step`` copies: Qwen2.5-VL's two-frame
  temporal patch, so it never shares a patch with a haystack frame; one frame for a per-frame
  encoder), so its index is ``int(depth * N)`` rounded down to a multiple of the step; frame
  counts must be multiples of the step. Positions follow the model's rule (Qwen2.5-VL: M-RoPE
  time of every frame pair from the video's fps).
* **Needles**: a set of (question, answer, image), every cell of the frames x depth grid asks
  each of them; a cell's score is the mean over the needles (LongVA asks its five standard
  needles, ``needle_datasets/dataset.json``: three multiple-choice with a letter answer, two
  open with a short answer). The set is a JSON list or JSONL file (:func:`read_needles`).
* **Scores**: the primary score is LongVA's: teacher forcing, correct iff the argmax after the
  prompt and each answer prefix is the next answer token, for every token of the answer
  (``eval_forward`` in ``eval_vision_niah.py``). The greedy reply (``--no-generation`` skips it)
  is scored by :func:`judge_reply`: a multiple-choice needle by the option the reply chooses
  (:func:`chosen_option`), an open needle as LongVA's token test reads in text: the reply
  (leading white space removed) begins with the answer, case and all.

The haystack's features are encoded once per N and reused across depths and needles
(``family.frame_feature_cache``). Output: ``results.jsonl`` (one line per frames x depth x
needle), ``results.json`` (mean grids, and per needle) and ``heatmap.png`` (mean grids).
"""

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2.functional as tvF

from omnilong.data.video import DecodedVideo, SampledVideo
from omnilong.eval.ask import generate_answer, reproduces_answer
from omnilong.eval.family import ModelFamily, Prompt, read_image
from omnilong.eval.groups import GroupResults
from omnilong.eval.report import grid_accuracy, write_heatmaps, write_json
from omnilong.generation.loading import InferenceModel

# LongVA's instruction after the options of its multiple-choice needles (needle_datasets/dataset.json).
MULTIPLE_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_OPTION_LINE = re.compile(r"^([A-Z])\. (.*\S)\s*$", re.MULTILINE)
# "Answer:", "Option:", "The answer is", "The correct option is", ... before the chosen letter.
_ANSWER_LABEL = re.compile(r"^(?:the\s+)?(?:(?:correct|best)\s+)?(?:answer|option)(?:\s+is)?\s*:?\s*", re.IGNORECASE)
# A letter that stands alone at the reply's start: "C", "C.", "(C)", "C: Panda"; not "A panda".
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:[.):,]|\s*$)")


@dataclass(frozen=True)
class Needle:
    """One needle: an image and the question asked about it after the video.

    Attributes:
        question: the text asked (for a multiple-choice needle with its option lines).
        answer: the expected answer (a multiple-choice needle: an option letter).
        image: ``[3, H, W]`` uint8 RGB.
        source: where the image came from (a path, for the reports).
        options: option letter -> text, parsed from the question's ``"X. text"`` lines; empty
            for an open needle.
    """

    question: str
    answer: str
    image: torch.Tensor
    source: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def multiple_choice(self) -> bool:
        return bool(self.options)


def make_needle(question: str, answer: str, image: torch.Tensor, source: str, options: Sequence[str] = ()) -> Needle:
    """A :class:`Needle`; ``options`` (texts) are appended to ``question`` as LongVA writes them
    (``"A. text"`` lines, then :data:`MULTIPLE_CHOICE_INSTRUCTION`). A question that already
    lists ``"A. ..."``, ``"B. ..."`` lines (LongVA's ``dataset.json`` prompts) is multiple choice
    as it stands.

    Raises:
        ValueError: an empty answer, or a multiple-choice answer that is not one of its letters
            (names ``source``).
    """
    if options:
        lines = [f"{chr(ord('A') + i)}. {text}" for i, text in enumerate(options)]
        question = "\n".join([question, *lines, MULTIPLE_CHOICE_INSTRUCTION])
    found = dict(_OPTION_LINE.findall(question))
    parsed = found if len(found) >= 2 else {}
    if not answer.strip():
        raise ValueError(f"{source}: the needle's answer is empty")
    if parsed and answer not in parsed:
        raise ValueError(f"{source}: multiple-choice answer {answer!r} is not one of the options {sorted(parsed)}")
    return Needle(question, answer, image, source, parsed)


def read_needles(path: Path) -> list[Needle]:
    """The needle set of a JSON list or JSONL file: per needle ``question``, ``answer``,
    ``image`` (a path, relative to the file's folder) and optionally ``options`` (a list of
    option texts, see :func:`make_needle`). LongVA's ``dataset.json`` keys ``prompt`` and
    ``path`` are read as ``question`` and ``image``.

    Raises:
        FileNotFoundError: the file or an image is missing.
        ValueError: a needle without question, answer or image, or an undecodable image or
            bad answer (names the file and the needle's number, from 1).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: needle file not found")
    text = path.read_text()
    try:
        entries = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON list or JSONL of needles ({e})") from e
    needles = []
    for number, entry in enumerate(entries, 1):
        where = f"{path}: needle {number}"
        question, image = entry.get("question", entry.get("prompt")), entry.get("image", entry.get("path"))
        if question is None or image is None or entry.get("answer") is None:
            raise ValueError(f"{where}: needs question (or prompt), answer and image (or path)")
        image_path = path.parent / image
        try:
            needle = make_needle(
                question, str(entry["answer"]), read_image(image_path), str(image_path), entry.get("options", ())
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        needles.append(needle)
    if not needles:
        raise ValueError(f"{path}: no needles")
    return needles


def chosen_option(reply: str, options: dict[str, str]) -> str:
    """The option a reply chooses, ``""`` for none: after an optional label ("Answer:", "The
    correct option is", ...), an option letter standing alone at the start ("C", "C.", "(C)",
    "C: Panda"); else the one option whose text the reply contains (case-insensitive; "A panda"
    chooses "C. Panda", not A); several or none: ``""``."""
    text = _ANSWER_LABEL.sub("", reply.strip())
    letter = _LEADING_LETTER.match(text)
    if letter is not None and letter.group(1) in options:
        return letter.group(1)
    named = [key for key, option in options.items() if option.casefold() in text.casefold()]
    return named[0] if len(named) == 1 else ""


def judge_reply(needle: Needle, reply: str) -> tuple[bool, str | None]:
    """Whether a generated reply answers ``needle``, and the option it chose (``None`` for an
    open needle); the rules are in the module docstring."""
    if needle.multiple_choice:
        chosen = chosen_option(reply, needle.options)
        return chosen == needle.answer, chosen
    return reply.lstrip().startswith(needle.answer), None


def _haystack(path: Path, fps: float) -> SampledVideo:
    """``path`` sampled at exactly ``fps`` from its start over its whole length (no frame cap:
    a cap would lower the rate of a long video)."""
    return SampledVideo(path, fps, max_frames=sys.maxsize)


def check_frame_counts(path: Path, fps: float, frame_counts: Sequence[int], step: int = 1) -> int:
    """Check that ``path`` holds every count of ``frame_counts`` at ``fps`` (from the stream's
    metadata; nothing is decoded) and that each is a positive multiple of ``step``.

    Returns:
        The frames the video holds at ``fps``.

    Raises:
        FileNotFoundError, VideoDecodeError: as :func:`~omnilong.data.video.decode_video`.
        ValueError: a count that is not a positive multiple of ``step``, or counts the video is
            too short for (names the video, its length at ``fps`` and the counts).
    """
    bad = [n for n in frame_counts if n < 1 or n % step]
    if bad:
        raise ValueError(f"frame counts must be positive multiples of {step} (the model's encoding step), got {bad}")
    available = _haystack(path, fps).num_frames
    too_long = [n for n in frame_counts if n > available]
    if too_long:
        raise ValueError(
            f"{path}: holds {available} frames at {fps:g} fps ({available / fps:g} s), "
            f"fewer than the frame counts {too_long}"
        )
    return available


def needle_index(depth: float, count: int, step: int) -> int:
    """Index of the needle's first frame in a haystack of ``count`` frames: LongVA's
    ``int(depth * count)``, rounded down to a multiple of ``step``."""
    return int(depth * count) // step * step


def insert_needle(frames: torch.Tensor, needle: torch.Tensor, depth: float, step: int) -> tuple[torch.Tensor, int]:
    """``frames [T, 3, H, W]`` (T a multiple of ``step``) with ``step`` copies of ``needle``
    (resized to ``H x W``) inserted before frame :func:`needle_index` ``(depth, T, step)``.

    Returns:
        ``([T + step, 3, H, W], index of the first needle frame)``.
    """
    index = needle_index(depth, frames.shape[0], step)
    needle = tvF.resize(needle, list(frames.shape[-2:]), antialias=True)[None].expand(step, -1, -1, -1)
    return torch.cat([frames[:index], needle, frames[index:]]), index


def _scores(records: Sequence[dict], names: Sequence[str]) -> dict[str, Any]:
    """Mean accuracies and frames x depth grids of ``records`` for each score name."""
    return {
        **{f"accuracy_{n}": sum(r[f"{n}_correct"] for r in records) / len(records) for n in names},
        "grids": {n: grid_accuracy(records, "frames", "depth", f"{n}_correct") for n in names},
    }


def run_vniah(
    loaded: InferenceModel,
    family: ModelFamily,
    output_dir: Path,
    haystack_video: Path,
    needles: Sequence[Needle],
    frame_counts: Sequence[int],
    depths: Sequence[float],
    max_new_tokens: int = 16,
    generate: bool = True,
) -> dict[str, Any]:
    """Run V-NIAH over ``frame_counts x depths x needles``; writes ``results.jsonl``,
    ``results.json`` and ``heatmap.png`` into ``output_dir`` (rank 0; every rank computes).

    Returns:
        The summary written to ``results.json``: ``accuracy_forced`` / ``accuracy_generation``
        and ``grids`` (the mean over needles), and ``needles`` (each needle's question, answer,
        image, options and its own accuracies and grids).

    Raises:
        ValueError: no needle, a depth outside 0..1, or frame counts the video is too short for
            or that are not multiples of the model's encoding step (before anything is decoded).
    """
    step = family.frames_per_step
    if not needles:
        raise ValueError("V-NIAH needs at least one needle")
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths must lie in 0..1, got {list(depths)}")
    fps = family.video_options.fps
    check_frame_counts(haystack_video, fps, frame_counts, step)
    haystack = _haystack(haystack_video, fps).decode(indices=range(max(frame_counts)))
    results = GroupResults(loaded, output_dir / "results.jsonl", resume=False)
    items = [(n, d, k) for n in frame_counts for d in depths for k in range(len(needles))]
    with family.frame_feature_cache(loaded.model) as cache:
        for count, depth, k in results.run(items, "V-NIAH", cost=lambda item: item[0]):
            needle = needles[k]
            frames = haystack.frames[:count]
            video, index = insert_needle(frames, needle.image, depth, step)
            keys = [("haystack", count, j) for j in range(index // step)] + [("needle", k, count)]
            keys += [("haystack", count, j) for j in range(index // step, count // step)]
            prompt = Prompt(needle.question, video=DecodedVideo(video, haystack.fps))
            record: dict[str, Any] = {
                "frames": count,
                "haystack_frames": count,
                "depth": float(depth),
                "needle": k,
                "needle_frame": index,
            }
            cache.expect(keys)
            record["forced_correct"] = reproduces_answer(loaded, family, prompt, needle.answer)
            if generate:
                cache.expect(keys)
                text, record["tokens"] = generate_answer(loaded, family, prompt, max_new_tokens)
                record["answer"] = text
                record["generation_correct"], chosen = judge_reply(needle, text)
                if chosen is not None:
                    record["chosen"] = chosen
            results.write(record)
        encoded = results.total(cache.encoded)  # over the groups
    records = results.finish()  # every group's, in item order
    names = ["forced"] + (["generation"] if generate else [])
    summary = {
        "evaluation": "vniah",
        "items": len(records),
        "haystack_video": str(haystack_video),
        "haystack_fps": haystack.fps,
        "frame_counts": list(frame_counts),
        "depths": list(depths),
        "frame_steps_encoded": encoded,
        **_scores(records, names),
        "needles": [
            {
                "question": needle.question,
                "answer": needle.answer,
                "image": needle.source,
                "options": needle.options,
                **_scores([r for r in records if r["needle"] == k], names),
            }
            for k, needle in enumerate(needles)
        ],
    }
    if loaded.is_main:
        write_json(output_dir / "results.json", summary)
        write_heatmaps(
            output_dir / "heatmap.png",
            {f"V-NIAH ({name}, mean of {len(needles)} needles)": grid for name, grid in summary["grids"].items()},
            "haystack frames",
            "needle depth",
        )
    return summary
