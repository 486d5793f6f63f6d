"""Text needle in a haystack with the tiny model and this Python's standard-library sources.

The tiny model is random, so accuracy itself is not the point here; what is tested: the
needle sits at a sentence boundary found with the model's tokenizer, deeper for a larger
depth, in prompts of the asked length; the two scorers agree on the model's own greedy
answer; results.jsonl / results.json hold the length x depth grid."""

import importlib.util
import json

import pytest

from omnilong.eval.ask import generate_answer, reproduces_answer
from omnilong.eval.family import Prompt
from omnilong.eval.niah import (
    NEEDLE,
    QUESTION,
    build_items,
    default_lengths,
    read_haystack,
    run_niah,
    sentence_boundaries,
)
from omnilong.testing import python_stdlib_sources


def test_default_lengths_double_up_to_the_limit():
    assert default_lengths(5000) == [1024, 2048, 4096, 5000]
    assert default_lengths(4096) == [1024, 2048, 4096]


def test_needle_at_a_sentence_boundary_at_its_depth(tiny_inference):
    loaded, family = tiny_inference
    tokenizer = loaded.tokenizer
    haystack = read_haystack(python_stdlib_sources(3), tokenizer, 400)
    items = build_items(tokenizer, family, haystack, [160, 400], [0.0, 0.5, 1.0], seed=0)
    assert [(i.length, i.depth) for i in items] == [
        (160, 0.0),
        (160, 0.5),
        (160, 1.0),
        (400, 0.0),
        (400, 0.5),
        (400, 1.0),
    ]
    for length in (160, 400):
        offsets = []
        for item in (i for i in items if i.length == length):
            needle = NEEDLE.format(number=item.number)
            assert item.context.count(needle) == 1 and len(item.number) == 7
            at = item.context.index(needle)
            before = item.context[: at - 1]  # the needle is joined with one space
            assert at == 1 or before.endswith("\n") or before.rstrip(" ").endswith((".", "!", "?"))
            offsets.append(at / (len(item.context) - len(needle) - 2))  # share of the haystack before it
            tokens = family.prompt_inputs(Prompt(item.context + "\n\n" + QUESTION))[0]["input_ids"].shape[1]
            # At most the length (re-tokenizing the decoded haystack may merge a token or two); less by
            # the partial line cut off at the end, a few tokens, a fair share of these tiny lengths.
            assert 0.75 * length < tokens <= length + 2
        assert offsets[0] < 0.05 and 0.25 < offsets[1] < 0.75 and offsets[2] > 0.95


def test_sentence_boundaries_follow_the_tokenizer(tiny_inference):
    tokenizer = tiny_inference[0].tokenizer
    ids = tokenizer("x = 1\nIt ends. Next one! os.path", add_special_tokens=False)["input_ids"]
    texts = tokenizer.batch_decode([[i] for i in ids])
    starts = ["".join(texts[:b]) for b in sentence_boundaries(tokenizer, ids)]
    assert "x = 1\n" in starts and "x = 1\nIt ends." in starts and "x = 1\nIt ends. Next one!" in starts
    assert not any(s.endswith("os.") for s in starts)  # a dot inside a name is no sentence end


def test_teacher_forcing_accepts_exactly_the_greedy_answer(tiny_inference):
    loaded, family = tiny_inference
    prompt = Prompt("def main():\n    return 1\n\n" + QUESTION)
    answer, _ = generate_answer(loaded, family, prompt, 2)
    assert answer and answer == loaded.tokenizer.decode(loaded.tokenizer(answer)["input_ids"])
    assert reproduces_answer(loaded, family, prompt, answer)
    assert not reproduces_answer(loaded, family, prompt, answer + "9")


def test_run_writes_items_and_the_length_depth_grid(family_inference, tmp_path):
    loaded, family = family_inference
    summary = run_niah(loaded, family, tmp_path, python_stdlib_sources(3), [128, 192], [0.0, 1.0], max_new_tokens=2)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["length"] for r in records} == {128, 192}
    assert all(r["generation_correct"] == (r["number"] in r["answer"]) for r in records)
    grid = summary["grids"]["forced"]
    assert (grid["rows"], grid["columns"]) == ([128, 192], [0.0, 1.0])
    assert summary["accuracy_forced"] == sum(r["forced_correct"] for r in records) / 4
    assert json.loads((tmp_path / "results.json").read_text()) == summary
    assert (tmp_path / "heatmap.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)
    with pytest.raises(ValueError, match="too short"):
        run_niah(loaded, family, tmp_path, python_stdlib_sources(3), [20], [0.5])
