"""Text needle in a haystack with the tiny models and the default prose haystack.

The tiny models are random, so accuracy itself is not the point here; what is tested: the
rules taken from the needle-in-a-haystack test (gkamradt/LLMTest_NeedleInAHaystack,
``needlehaystack/llm_needle_haystack_tester.py``) and LongVA's text NIAH
(``text_extend/eval_text_niah.py``): linear length grids with room for the answer, documents
repeated when the haystack is short, several needles per cell averaged, finished items kept on
a rerun; and OmniLong's own: the needle at a sentence boundary found with the model's tokenizer,
deeper for a larger depth, in prompts of the asked length; the two scorers agreeing on the
model's own greedy answer; results.jsonl / results.json holding the length x depth grid."""

import importlib.util
import json

import pytest

from omnilong.eval import niah
from omnilong.eval.ask import generate_answer, reproduces_answer
from omnilong.eval.family import Prompt
from omnilong.eval.niah import (
    DEFAULT_HAYSTACK,
    NEEDLE,
    QUESTION,
    build_items,
    default_lengths,
    read_documents,
    read_haystack,
    run_niah,
    sentence_boundaries,
)


def test_default_lengths_are_linear_and_leave_room_for_the_answer():
    # LongVA: range(min, max + 1, interval) (evenly spaced, not doubling); gkamradt: linspace up
    # to the largest length, less final_context_length_buffer for the answer.
    lengths = default_lengths(128000, margin=16, count=8)
    assert lengths == [15998 * k for k in range(1, 9)]
    assert lengths[-1] + 16 <= 128000
    assert default_lengths(1000, margin=10, count=3) == [330, 660, 990]
    with pytest.raises(ValueError, match="below the limit 10"):
        default_lengths(10, margin=8, count=4)


def test_default_haystack_is_prose_read_once_and_short_documents_repeat(tiny_inference):
    tokenizer = tiny_inference[0].tokenizer
    documents = read_documents([DEFAULT_HAYSTACK])
    ids, passes = read_haystack(documents, tokenizer, 2000)
    assert len(ids) == 2000 and passes == 1
    assert tokenizer.decode(ids).startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n\nChapter 1\n\nIt is a truth")
    # gkamradt and LongVA read the haystack files again until the longest length is reached.
    short = ["It rained. Then it stopped."]
    once = tokenizer(short[0] + "\n\n", add_special_tokens=False)["input_ids"]
    ids, passes = read_haystack(short, tokenizer, 3 * len(once) + 1)
    assert passes == 4 and ids == (once * 4)[: 3 * len(once) + 1]
    with pytest.raises(ValueError, match="no documents"):
        read_haystack([], tokenizer, 10)


def test_needles_at_a_sentence_boundary_at_their_depth(tiny_inference):
    loaded, family = tiny_inference
    tokenizer = loaded.tokenizer
    haystack, _ = read_haystack(read_documents([DEFAULT_HAYSTACK]), tokenizer, 400)
    items = build_items(tokenizer, family, haystack, [160, 400], [0.0, 0.5, 1.0], seed=0, needles=2)
    assert [(i.length, i.depth, i.needle) for i in items] == [
        (length, depth, needle) for length in (160, 400) for depth in (0.0, 0.5, 1.0) for needle in (0, 1)
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
            # the partial sentence cut off at the end, a fair share of these tiny lengths.
            assert 0.6 * length < tokens <= length + 2
        # two needles per depth: same place, their own numbers
        assert offsets[0::2] == offsets[1::2]
        assert offsets[0] < 0.05 and 0.25 < offsets[2] < 0.75 and offsets[4] > 0.95
    cells = {}
    for item in items:
        cells.setdefault((item.length, item.depth), set()).add(item.number)
    assert all(len(numbers) == 2 for numbers in cells.values())
    # A needle's number depends on its cell and index only: growing the grid keeps the others.
    smaller = build_items(tokenizer, family, haystack, [400], [0.5], seed=0, needles=1)
    assert smaller == [i for i in items if (i.length, i.depth, i.needle) == (400, 0.5, 0)]


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


def test_run_averages_the_needles_of_each_cell(family_inference, tmp_path):
    loaded, family = family_inference
    summary = run_niah(
        loaded, family, tmp_path, [DEFAULT_HAYSTACK], [128, 192], [0.0, 1.0], max_new_tokens=2, needles=2
    )
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert (
        len(records) == 8 and {r["length"] for r in records} == {128, 192} and {r["needle"] for r in records} == {0, 1}
    )
    assert all(r["generation_correct"] == (r["number"] in r["answer"]) for r in records)
    grid = summary["grids"]["forced"]
    assert (grid["rows"], grid["columns"]) == ([128, 192], [0.0, 1.0])
    for i, length in enumerate(grid["rows"]):
        for j, depth in enumerate(grid["columns"]):
            cell = [r["forced_correct"] for r in records if (r["length"], r["depth"]) == (length, depth)]
            assert len(cell) == 2 and grid["accuracy"][i][j] == sum(cell) / 2
    assert summary["accuracy_forced"] == sum(r["forced_correct"] for r in records) / 8
    assert summary["needles_per_cell"] == 2 and summary["haystack"]["passes"] == 1
    assert json.loads((tmp_path / "results.json").read_text()) == summary
    assert (tmp_path / "heatmap.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)
    with pytest.raises(ValueError, match="too short"):
        run_niah(loaded, family, tmp_path / "short", [DEFAULT_HAYSTACK], [20], [0.5])


def test_rerun_keeps_finished_items_and_refuses_other_settings(tiny_inference, tmp_path, monkeypatch):
    # gkamradt's tester skips a (length, depth) whose result file exists; here the finished
    # items of results.jsonl are kept when the settings match, and a torn last line is dropped.
    loaded, family = tiny_inference
    asked = []

    def counting(loaded, family, prompt, answer):
        asked.append(answer)
        return reproduces_answer(loaded, family, prompt, answer)

    monkeypatch.setattr(niah, "reproduces_answer", counting)
    run = dict(max_new_tokens=2, generate=False, needles=2)
    first = run_niah(loaded, family, tmp_path, [DEFAULT_HAYSTACK], [128], [0.0, 1.0], **run)
    assert len(asked) == 4 and first["items_kept"] == 0
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write('{"length": 192, "dep')  # the process stopped while writing
    asked.clear()
    second = run_niah(loaded, family, tmp_path, [DEFAULT_HAYSTACK], [128, 192], [0.0, 1.0], **run)
    assert len(asked) == 4 and second["items_kept"] == 4 and second["items"] == 8
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 8 and records[:4] == [r for r in records if r["length"] == 128]
    assert second["grids"]["forced"]["accuracy"][0] == first["grids"]["forced"]["accuracy"][0]
    with pytest.raises(ValueError, match=r"other settings \(seed 0 then, 1 now\).*--restart"):
        run_niah(loaded, family, tmp_path, [DEFAULT_HAYSTACK], [128], [0.0], seed=1, **run)
    other = tmp_path / "other.txt"
    other.write_text("A different haystack. " * 80)
    with pytest.raises(ValueError, match="haystack_sha256"):
        run_niah(loaded, family, tmp_path, [other], [128], [0.0], **run)
    asked.clear()
    fresh = run_niah(loaded, family, tmp_path, [other], [128], [0.0], restart=True, **run)
    assert len(asked) == 2 and fresh["items_kept"] == 0
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
