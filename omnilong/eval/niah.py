"""Text needle in a haystack (NIAH).

A needle sentence holding a random 7-digit number is put into a haystack of prose at relative
depths 0..1, for prompt lengths evenly spaced up to the model's limit less room for the answer.
The default haystack is Jane Austen's *Pride and Prejudice* (public domain; see
``data/README.md``); any local text files can replace it. As in the needle-in-a-haystack test
(gkamradt/LLMTest_NeedleInAHaystack) and LongVA's ``text_extend/eval_text_niah.py``, the
documents are read again from the start when they hold fewer tokens than the longest length
(the number of passes is recorded). The haystack is tokenized once with the model's own
tokenizer and cut at the last sentence boundary that fits the length; the needle goes at the
boundary nearest its depth (a boundary: after a token ending a line, or after a token ending in
``.``, ``!`` or ``?`` followed by whitespace). The question comes after the haystack, in one
user turn. Each (length, depth) cell holds several needles, each with its own number (LongVA
averages 3 to 10 per cell in its text test, 5 in V-NIAH); a cell's score is their mean.

Two scores per item: *teacher forcing* (the number appended as the answer; correct iff the
argmax at every answer position is the next answer token) and *generation* (greedy answer;
correct iff it contains the number). Items go to ``results.jsonl`` as they are done and a rerun
keeps those made with the same settings (``settings.json``: checkpoint, dtype, haystack, seed,
scoring); the summary, with a length x depth grid per score, goes to ``results.json``, the
grids to ``heatmap.png``.
"""

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omnilong.data.sources import read_text_documents
from omnilong.eval.ask import generate_answer, reproduces_answer
from omnilong.eval.family import ModelFamily, Prompt
from omnilong.eval.groups import GroupResults
from omnilong.eval.report import grid_accuracy, write_heatmaps, write_json
from omnilong.generation.loading import InferenceModel
from omnilong.jsonl import read_appended_jsonl

logger = logging.getLogger(__name__)

NEEDLE = "The special magic number is {number}."
QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."
DEFAULT_HAYSTACK = Path(__file__).parent / "data" / "pride_and_prejudice.txt"
_SENTENCE_ENDS = (".", "!", "?")


@dataclass(frozen=True)
class NiahItem:
    """One haystack with its needle: ``context`` holds ``number`` at ``depth`` (0 start, 1 end);
    ``needle`` numbers the needles of one (length, depth) cell from 0."""

    length: int
    depth: float
    needle: int
    number: str
    context: str


def default_lengths(limit: int, margin: int, count: int = 8) -> list[int]:
    """``count`` lengths evenly spaced up to ``limit - margin``: ``step, 2 * step, ...,
    count * step`` with ``step = (limit - margin) // count`` (a linear grid, as LongVA's
    ``range(min, max + 1, interval)`` with ``min = interval``; ``margin`` leaves room for the
    answer below the model's limit, as gkamradt's ``final_context_length_buffer``).

    Raises:
        ValueError: ``limit - margin`` is smaller than ``count``.
    """
    step = (limit - margin) // count
    if step < 1:
        raise ValueError(f"no {count} lengths fit below the limit {limit} less the answer's {margin} tokens")
    return [step * k for k in range(1, count + 1)]


def read_documents(files: Sequence[Path]) -> list[str]:
    """The texts of ``files`` (:func:`~omnilong.data.sources.read_text_documents`: a plain-text
    file is one document, JSONL/JSON/parquet records' ``text`` fields are one each)."""
    return [text for _, text in read_text_documents(files)]


def read_haystack(documents: Sequence[str], tokenizer: Any, max_tokens: int) -> tuple[list[int], int]:
    """The first ``max_tokens`` token ids of ``documents`` joined by blank lines, read again from
    the first document when they run out, and the number of passes over them that took (1: no
    repetition).

    Raises:
        ValueError: the documents hold no tokens.
    """
    ids: list[int] = []
    tokenized: list[list[int]] = []  # each document is tokenized once, however many passes
    passes = 0
    while len(ids) < max_tokens:
        passes += 1
        for k, text in enumerate(documents):
            if k == len(tokenized):
                tokenized.append(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
            ids += tokenized[k]
            if len(ids) >= max_tokens:
                break
        if not ids:
            raise ValueError("the haystack holds no documents")
    return ids[:max_tokens], passes


def sentence_boundaries(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """Indices ``i`` (``0..len(ids)``) where a sentence may start before ``ids[i]``: 0; after a
    token ending a line; after a token ending in ``.!?`` when the next token starts with
    whitespace or there is none."""
    texts = tokenizer.batch_decode([[i] for i in ids])
    boundaries = [0]
    for i in range(1, len(ids) + 1):
        before, after = texts[i - 1], texts[i] if i < len(ids) else " "
        if before.endswith("\n") or (before.rstrip(" ").endswith(_SENTENCE_ENDS) and after[:1].isspace()):
            boundaries.append(i)
    return boundaries


def needle_number(seed: int, length: int, depth: float, needle: int) -> str:
    """The 7-digit number of one needle, drawn from ``seed`` and the needle's cell and index
    alone, so that adding lengths, depths or needles to a grid leaves the others' numbers."""
    return str(random.Random(f"{seed}:{length}:{depth}:{needle}").randrange(1_000_000, 10_000_000))


def build_items(
    tokenizer: Any,
    family: ModelFamily,
    haystack: Sequence[int],
    lengths: Sequence[int],
    depths: Sequence[float],
    seed: int,
    needles: int = 1,
) -> list[NiahItem]:
    """``needles`` items per ``(length, depth)``: the haystack cut so that the whole prompt is
    about ``length`` tokens, the needle at the boundary nearest ``depth``, each needle with its
    own number (:func:`needle_number`).

    Raises:
        ValueError: a depth outside 0..1, or a length too short for the question and needle.
    """
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths must lie in 0..1, got {list(depths)}")
    overhead = family.prompt_inputs(Prompt("\n\n" + QUESTION))[0]["input_ids"].shape[1]
    needle_tokens = len(tokenizer(" " + NEEDLE.format(number="0000000") + " ", add_special_tokens=False)["input_ids"])
    items = []
    for length in lengths:
        budget = length - overhead - needle_tokens
        if budget < 1:
            raise ValueError(
                f"NIAH length {length} is too short: the question and needle take {overhead + needle_tokens} tokens"
            )
        boundaries = sentence_boundaries(tokenizer, haystack[:budget])
        hay = list(haystack[: boundaries[-1]])  # the haystack ends at a boundary too (depth 1)
        for depth in depths:
            cut = min(boundaries, key=lambda b: abs(b - depth * len(hay)))
            before, after = tokenizer.decode(hay[:cut]), tokenizer.decode(hay[cut:])
            for needle in range(needles):
                number = needle_number(seed, length, float(depth), needle)
                context = before + " " + NEEDLE.format(number=number) + " " + after
                items.append(NiahItem(length, float(depth), needle, number, context))
    return items


def _key(record: dict[str, Any]) -> tuple:
    return record["length"], record["depth"], record["needle"], record["number"]


def finished_records(output_dir: Path, settings: dict[str, Any], repair: bool) -> dict[tuple, dict[str, Any]]:
    """The records of an earlier run's ``output_dir/results.jsonl`` by (length, depth, needle,
    number), empty when there is none. A torn last line is dropped (and cut from the file with
    ``repair``: :func:`~omnilong.jsonl.read_appended_jsonl`).

    Raises:
        ValueError: the earlier run's ``settings.json`` differs from ``settings`` (the
            differences named) or is missing.
    """
    path = output_dir / "results.jsonl"
    records = read_appended_jsonl(path, repair=repair) if path.is_file() else []
    if not records:
        return {}
    settings_path = output_dir / "settings.json"
    earlier = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    changed = [f"{k} {earlier.get(k)!r} then, {v!r} now" for k, v in settings.items() if earlier.get(k) != v]
    if changed:
        raise ValueError(
            f"{path} holds results made with other settings ({'; '.join(changed)}): "
            "give another --output, or --restart to discard them"
        )
    return {_key(r): r for r in records}


def run_niah(
    loaded: InferenceModel,
    family: ModelFamily,
    output_dir: Path,
    haystack_files: Sequence[Path],
    lengths: Sequence[int],
    depths: Sequence[float],
    seed: int = 0,
    max_new_tokens: int = 16,
    generate: bool = True,
    needles: int = 5,
    restart: bool = False,
) -> dict[str, Any]:
    """Run NIAH over ``lengths x depths`` with ``needles`` per cell and write ``settings.json``,
    ``results.jsonl``, ``results.json`` and ``heatmap.png`` into ``output_dir`` (rank 0; every
    rank computes). Items already in ``results.jsonl`` from a run with the same settings are
    kept, not made again, unless ``restart``.

    Returns:
        The summary written to ``results.json``.

    Raises:
        ValueError: ``results.jsonl`` was made with other settings (:func:`finished_records`).
    """
    documents = read_documents(haystack_files)
    settings = {
        "checkpoint": str(loaded.model_dir),
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "haystack_sha256": hashlib.sha256("\0".join(documents).encode()).hexdigest(),
        "seed": seed,
        "generation": generate,
        "max_new_tokens": max_new_tokens,
    }
    results = GroupResults(loaded, output_dir / "results.jsonl", resume=not restart)  # restart: emptied
    done = finished_records(output_dir, settings, repair=loaded.is_main)
    haystack, passes = read_haystack(documents, loaded.tokenizer, max(lengths))
    items = build_items(loaded.tokenizer, family, haystack, lengths, depths, seed, needles)
    todo = [item for item in items if _key(asdict(item)) not in done]
    logger.info(
        "NIAH: %d lengths x %d depths x %d needles, %d items kept from %s, %d to go",
        len(lengths),
        len(depths),
        needles,
        len(items) - len(todo),
        output_dir / "results.jsonl",
        len(todo),
    )
    if loaded.is_main and not done:  # else the same settings are there already
        write_json(output_dir / "settings.json", settings)
    for item in results.run(todo, "NIAH", cost=lambda item: item.length):
        prompt = Prompt(item.context + "\n\n" + QUESTION)
        record: dict[str, Any | None] = {k: v for k, v in asdict(item).items() if k != "context"}
        record["forced_correct"] = reproduces_answer(loaded, family, prompt, item.number)
        if generate:
            answer, record["tokens"] = generate_answer(loaded, family, prompt, max_new_tokens)
            record.update(answer=answer, generation_correct=item.number in answer)
        else:
            record["tokens"] = family.prompt_inputs(prompt)[0]["input_ids"].shape[1]
        results.write(record)
    done.update((_key(record), record) for record in results.finish())  # every group's
    records = [done[_key(asdict(item))] for item in items]
    scores = ["forced_correct"] + (["generation_correct"] if generate else [])
    summary = {
        "evaluation": "niah",
        "items": len(records),
        "items_kept": len(items) - len(todo),
        "lengths": list(lengths),
        "depths": list(depths),
        "needles_per_cell": needles,
        "haystack": {"files": [str(f) for f in haystack_files], "tokens": len(haystack), "passes": passes},
        "settings": settings,
        **{f"accuracy_{s.removesuffix('_correct')}": sum(r[s] for r in records) / len(records) for s in scores},
        "grids": {s.removesuffix("_correct"): grid_accuracy(records, "length", "depth", s) for s in scores},
    }
    if loaded.is_main:
        write_json(output_dir / "results.json", summary)
        write_heatmaps(
            output_dir / "heatmap.png",
            {f"NIAH ({name})": grid for name, grid in summary["grids"].items()},
            "prompt length (tokens)",
            "needle depth",
        )
    return summary
