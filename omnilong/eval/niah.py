"""Text needle in a haystack (NIAH).

A needle sentence holding a random 7-digit number is put into a haystack of real text (local
files; the demo uses this Python's standard-library sources) at relative depths 0..1, for
prompt lengths from 1K tokens up to the model's limit. The haystack is tokenized once with
the model's own tokenizer and cut at the last sentence boundary that fits the length; the
needle goes at the boundary nearest its depth (a boundary: after a token ending a line, or
after a token ending in ``.``, ``!`` or ``?`` followed by whitespace). The question comes
after the haystack, in one user turn.

Two scores per item: *teacher forcing* (the number appended as the answer; correct iff the
argmax at every answer position is the next answer token) and *generation* (greedy answer;
correct iff it contains the number). Items go to ``results.jsonl`` as they are done; the
summary, with a length x depth grid per score, to ``results.json``, and the grids to
``heatmap.png``.
"""

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

NEEDLE = "The special magic number is {number}."
QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."
_SENTENCE_ENDS = (".", "!", "?")


@dataclass(frozen=True)
class NiahItem:
    """One haystack with its needle: ``context`` holds ``number`` at ``depth`` (0 start, 1 end)."""

    length: int
    depth: float
    number: str
    context: str


def default_lengths(limit: int, start: int = 1024) -> list[int]:
    """``start, 2 * start, ...`` below ``limit``, then ``limit``."""
    lengths = []
    while start < limit:
        lengths.append(start)
        start *= 2
    return lengths + [limit]


def read_haystack(files: Sequence[Path], tokenizer: Any, max_tokens: int) -> list[int]:
    """Token ids of the documents of ``files`` in order, joined by blank lines, until
    ``max_tokens``.

    Raises:
        ValueError: the files hold fewer than ``max_tokens`` tokens (add files or lower the lengths).
    """
    ids: list[int] = []
    for _, text in read_text_documents(files):
        ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= max_tokens:
            return ids[:max_tokens]
    raise ValueError(
        f"the haystack files hold {len(ids)} tokens, fewer than the {max_tokens} the longest length "
        "needs: give more haystack files or lower the lengths"
    )


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


def build_items(
    tokenizer: Any,
    family: ModelFamily,
    haystack: Sequence[int],
    lengths: Sequence[int],
    depths: Sequence[float],
    seed: int,
) -> list[NiahItem]:
    """One item per ``(length, depth)``: the haystack cut so that the whole prompt is about
    ``length`` tokens, the needle at the boundary nearest ``depth``.

    Raises:
        ValueError: a depth outside 0..1, or a length too short for the question and needle.
    """
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths must lie in 0..1, got {list(depths)}")
    rng = random.Random(seed)
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
            number = str(rng.randrange(1_000_000, 10_000_000))
            context = (
                tokenizer.decode(hay[:cut]) + " " + NEEDLE.format(number=number) + " " + tokenizer.decode(hay[cut:])
            )
            items.append(NiahItem(length, float(depth), number, context))
    return items


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
) -> dict[str, Any]:
    """Run NIAH over ``lengths x depths`` and write ``results.jsonl``, ``results.json`` and
    ``heatmap.png`` into ``output_dir`` (rank 0; every rank computes).

    Returns:
        The summary written to ``results.json``.
    """
    haystack = read_haystack(haystack_files, loaded.tokenizer, max(lengths))
    items = build_items(loaded.tokenizer, family, haystack, lengths, depths, seed)
    results = GroupResults(loaded, output_dir / "results.jsonl", resume=False)
    for item in results.run(items, "NIAH", cost=lambda item: item.length):
        prompt = Prompt(item.context + "\n\n" + QUESTION)
        record: dict[str, Any | None] = {k: v for k, v in asdict(item).items() if k != "context"}
        record["forced_correct"] = reproduces_answer(loaded, family, prompt, item.number)
        if generate:
            answer, record["tokens"] = generate_answer(loaded, family, prompt, max_new_tokens)
            record.update(answer=answer, generation_correct=item.number in answer)
        else:
            record["tokens"] = family.prompt_inputs(prompt)[0]["input_ids"].shape[1]
        results.write(record)
    records = results.finish()  # every group's, in item order
    scores = ["forced_correct"] + (["generation_correct"] if generate else [])
    summary = {
        "evaluation": "niah",
        "items": len(records),
        "lengths": list(lengths),
        "depths": list(depths),
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
