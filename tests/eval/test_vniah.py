"""Visual needle in a haystack: LongVA's rules, and runs with each family's tiny model.

The benchmark rules checked here are those of LongVA's ``vision_niah`` evaluation
(github.com/EvolvingLMMs-Lab/LongVA, commit f4c8781d): the haystack is the first N frames at
1 fps from the video's start (``produce_haystack_embedding.py``: every ``round(avg_fps)``-th
frame; ``eval_vision_niah.py``: ``haystack[:num_frames]``), the needle goes before frame
``int(depth * N)`` (``query_frame_idx``), every cell asks each needle of a set and averages
(``needle_datasets/dataset.json``: three multiple-choice needles with a letter answer, two open).

Oracle for the feature cache: the same prompts with every encoding step (Qwen2.5-VL: frame
pair, LLaVA-OneVision: frame) encoded anew (no cache); tolerance 1e-5 on logits (features
are reused, not recomputed: the difference is the encoder's batch composition only)."""

import contextlib
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from omnilong.data.video import DecodedVideo, VideoOptions, decode_video
from omnilong.eval.family import Prompt, read_image
from omnilong.eval.vniah import (
    MULTIPLE_CHOICE_INSTRUCTION,
    chosen_option,
    insert_needle,
    judge_reply,
    make_needle,
    needle_index,
    read_needles,
    run_vniah,
)
from omnilong.generation.generate import cached_logits
from omnilong.testing.tiny_eval_data import write_needle_image

RED = torch.tensor([220, 30, 30], dtype=torch.uint8)[:, None, None].expand(3, 8, 8)
ANIMALS = ["Bird", "Elephant", "Panda", "Dog"]  # LongVA's panda_scientist.png needle, answer C


def test_needle_index_truncates_depth_times_frames_as_longva():
    """LongVA: ``query_frame_idx = int(depth * num_frames)`` (truncation, not rounding)."""
    assert [needle_index(d, 5, 1) for d in (0.0, 0.3, 0.5, 0.7, 1.0)] == [0, 1, 2, 3, 5]  # round: 0, 2, 2, 4, 5
    assert needle_index(0.2 * 3, 200, 1) == 120  # LongVA's np.arange depth 0.6000000000000001
    # A two-frame encoding step: int(depth * N), then down to the step's boundary.
    assert [needle_index(d, 10, 2) for d in (0.25, 0.5, 0.7, 0.95, 1.0)] == [2, 4, 6, 8, 10]


def test_needle_takes_a_whole_temporal_patch_at_its_depth():
    frames = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 3, 4, 4)
    needle = torch.full((3, 8, 8), 200, dtype=torch.uint8)
    for depth, index in ((0.0, 0), (0.3, 0), (0.7, 4), (1.0, 6)):  # int(depth * 6) down to a pair boundary
        video, at = insert_needle(frames, needle, depth, step=2)
        assert at == index and video.shape == (8, 3, 4, 4)
        assert (video[at : at + 2] == 200).all()  # resized to the frame size, both frames of one patch
        assert torch.equal(torch.cat([video[:at], video[at + 2 :]]), frames)


@pytest.mark.parametrize(
    "reply, chosen",
    [
        ("C", "C"),
        ("C.", "C"),
        ("(C) Panda", "C"),
        ("Answer: C", "C"),
        ("The correct option is C.", "C"),
        ("A panda.", "C"),  # the article is no letter: the reply names option C's text
        ("Dog", "D"),
        ("A", "A"),
        ("Based on the frame, I cannot tell.", ""),  # a capital B inside a word chooses nothing
        ("A bird or a dog", ""),  # two options named
        ("E", ""),  # not an option
    ],
)
def test_multiple_choice_reply_is_scored_by_the_option_it_chooses(reply, chosen):
    needle = make_needle("Find the frame of a scientist. The scientist is a...", "C", RED, "panda.png", ANIMALS)
    assert chosen_option(reply, needle.options) == chosen
    assert judge_reply(needle, reply) == (chosen == "C", chosen)


@pytest.mark.parametrize(
    "reply, correct",
    [("Yellow", True), (" Yellow balloon", True), ("yellow", False), ("The balloon is Yellow", False)],
)
def test_open_reply_must_begin_with_the_answer_as_longva_compares_tokens(reply, correct):
    """LongVA scores the answer's tokens right after the prompt, exactly: the reply's start, case and all."""
    needle = make_needle("What is the colour of that balloon?", "Yellow", RED, "sora_balloon.png")
    assert not needle.multiple_choice
    assert judge_reply(needle, reply) == (correct, None)


def test_needle_sets_read_from_jsonl_and_longva_json(tmp_path):
    write_needle_image(tmp_path / "images" / "red.png")
    (tmp_path / "set.jsonl").write_text(
        json.dumps({"question": "What colour?", "answer": "red", "image": "images/red.png"})
        + "\n"
        + json.dumps({"question": "Who?", "answer": "C", "image": "images/red.png", "options": ANIMALS})
        + "\n"
    )
    open_needle, choice = read_needles(tmp_path / "set.jsonl")
    assert (open_needle.question, open_needle.options, open_needle.image.shape) == ("What colour?", {}, (3, 56, 56))
    assert choice.question == "Who?\nA. Bird\nB. Elephant\nC. Panda\nD. Dog\n" + MULTIPLE_CHOICE_INSTRUCTION
    assert choice.options == dict(zip("ABCD", ANIMALS))
    # LongVA's dataset.json: "path" and "prompt", options already written into the prompt.
    prompt = "\nFind the frame of a teddy bear. Where is this teddy bear?\nA. Times Square\nB. Eiffel Tower\n"
    entry = {"path": "images/red.png", "prompt": prompt + MULTIPLE_CHOICE_INSTRUCTION, "answer": "A"}
    (tmp_path / "longva.json").write_text(json.dumps([entry]))
    (longva,) = read_needles(tmp_path / "longva.json")
    assert longva.question == entry["prompt"] and longva.options == {"A": "Times Square", "B": "Eiffel Tower"}
    (tmp_path / "bad.json").write_text(json.dumps([entry, {**entry, "answer": "E"}]))
    with pytest.raises(ValueError, match=r"bad.json: needle 2: .*answer 'E' is not one of the options \['A', 'B'\]"):
        read_needles(tmp_path / "bad.json")


def _grey_video(path: Path, frames: int = 20, fps: int = 5) -> Path:
    """Frame i is grey level 12 i (32 x 32), ``frames / fps`` seconds long."""
    from torchcodec.encoders import VideoEncoder

    levels = torch.arange(frames, dtype=torch.uint8) * 12
    VideoEncoder(levels.view(-1, 1, 1, 1).expand(-1, 3, 32, 32).contiguous(), frame_rate=fps).to_file(path, crf=0)
    return path


class _FakeFamily:
    """A model family without a model: the run's haystack, needles and scoring, not the model's numbers."""

    def __init__(self, step: int, fps: float):
        self.frames_per_step, self.video_options = step, VideoOptions(fps=fps)

    @contextlib.contextmanager
    def frame_feature_cache(self, model):
        yield SimpleNamespace(expect=lambda keys: None, encoded=0)


def _fake_model(monkeypatch, replies: dict[str, str]) -> list[Prompt]:
    """Teacher forcing always right for the answer "C" only; the reply of each question from
    ``replies``; returns the prompts asked."""
    asked = []
    monkeypatch.setattr(
        "omnilong.eval.vniah.reproduces_answer", lambda loaded, family, p, answer: asked.append(p) or answer == "C"
    )
    monkeypatch.setattr("omnilong.eval.vniah.generate_answer", lambda loaded, family, p, n: (replies[p.text], 9))
    return asked


def _source_frames(video: torch.Tensor) -> list[int]:
    """Which source frame of :func:`_grey_video` each frame is (its grey level / 12); needle frames (red): -1."""
    return [
        -1 if frame[0].float().mean() > frame[1].float().mean() + 50 else round(frame.float().mean().item() / 12)
        for frame in video
    ]


@pytest.mark.parametrize("counts", [[2], [2, 4]])
def test_haystack_is_the_first_frames_at_fps_whatever_the_other_counts(counts, tmp_path, monkeypatch):
    """A 4 s video at 5 fps, sampled at 1 fps: frames 0, 5, 10, 15; N frames are the first N of them.
    (Spread over the largest count, 2 frames alone would be frames 0 and 10.)"""
    asked = _fake_model(monkeypatch, {"q": "C"})
    video = _grey_video(tmp_path / "grey.mp4")
    needle = make_needle("q", "C", RED, "red", ())  # an open needle "C": teacher forcing right
    run_vniah(
        SimpleNamespace(is_main=True, model=None), _FakeFamily(2, 1.0), tmp_path / "out", video, [needle], counts, [0.5]
    )
    haystacks = {p.video.frames.shape[0] - 2: _source_frames(p.video.frames) for p in asked}
    assert haystacks[2] == [-1, -1, 0, 5]  # int(0.5 * 2) = 1, down to the pair boundary 0
    if 4 in counts:
        assert haystacks[4] == [0, 5, -1, -1, 10, 15]
    assert all(p.video.fps == 1.0 for p in asked)


@pytest.mark.parametrize(
    "counts, step, message",
    [
        ([2, 6], 2, r"grey.mp4: holds 4 frames at 1 fps \(4 s\), fewer than the frame counts \[6\]"),
        ([2, 3], 2, r"positive multiples of 2 .* got \[3\]"),
    ],
)
def test_counts_the_video_cannot_give_are_refused_before_any_work(counts, step, message, tmp_path, monkeypatch):
    asked = _fake_model(monkeypatch, {})
    video = _grey_video(tmp_path / "grey.mp4")
    needle = make_needle("q", "C", RED, "red", ())
    with pytest.raises(ValueError, match=message):
        run_vniah(
            SimpleNamespace(is_main=True, model=None),
            _FakeFamily(step, 1.0),
            tmp_path / "out",
            video,
            [needle],
            counts,
            [0.0],
        )
    assert asked == [] and not (tmp_path / "out").exists()


def test_a_set_of_needles_is_reported_per_needle_and_as_the_mean(tmp_path, monkeypatch):
    """Three needles per cell: an MC needle answered by its option's text, an MC needle whose
    reply only contains its letter inside a word ("Based ...": wrong, a substring test would say
    right), an open needle answered exactly. Teacher forcing: right for answer "C" only."""
    needles = [
        make_needle("scientist?", "C", RED, "panda.png", ANIMALS),
        make_needle("where?", "B", RED, "teddy.png", ["Times Square", "Eiffel Tower"]),
        make_needle("colour?", "Yellow", RED, "balloon.png"),
    ]
    replies = ["A panda.", "Based on the video, I cannot say.", "Yellow"]
    _fake_model(monkeypatch, {needle.question: reply for needle, reply in zip(needles, replies)})
    summary = run_vniah(
        SimpleNamespace(is_main=True, model=None),
        _FakeFamily(1, 1.0),
        tmp_path / "out",
        _grey_video(tmp_path / "grey.mp4"),
        needles,
        [2, 3],
        [0.0, 1.0],
    )
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 3 and [r["needle"] for r in records[:3]] == [0, 1, 2]
    assert [(r.get("chosen"), r["generation_correct"]) for r in records[:3]] == [("C", True), ("", False), (None, True)]
    per_needle = [(n["accuracy_forced"], n["accuracy_generation"]) for n in summary["needles"]]
    assert per_needle == [(1.0, 1.0), (0.0, 0.0), (0.0, 1.0)]
    assert summary["accuracy_forced"] == pytest.approx(1 / 3) and summary["accuracy_generation"] == pytest.approx(2 / 3)
    assert summary["grids"]["generation"]["accuracy"] == [[pytest.approx(2 / 3)] * 2] * 2  # each cell: mean of 3
    assert summary["needles"][1]["options"] == {"A": "Times Square", "B": "Eiffel Tower"}
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == summary


def _evaluate(argv: list[str], monkeypatch) -> int:
    """``tools/evaluate.py`` as a user runs it (its ``main()`` with ``argv``)."""
    spec = importlib.util.spec_from_file_location(
        "evaluate", Path(__file__).resolve().parents[2] / "tools" / "evaluate.py"
    )
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    monkeypatch.setattr(sys, "argv", ["evaluate", *argv])
    return evaluate.main()


@pytest.mark.parametrize(
    "needle_args, counts, message",
    [
        (
            ["--needle-image", "{n}", "--question", "q", "--answer", "a"],
            ["4", "8"],
            "holds 5 frames at 1 fps (5 s), fewer than the frame counts [8]",
        ),
        (["--needles", "{set}", "--question", "q"], ["4"], "--needles replaces --question: give one or the other"),
        (["--needle-image", "{n}"], ["4"], "give --needles FILE, or --question, --answer for one needle"),
    ],
)
def test_command_line_refuses_before_the_model_loads(
    needle_args, counts, message, tiny_videos_dir, tmp_path, monkeypatch, capsys
):
    """``video_004.mp4`` is 5 s (30 frames at 6 fps): 5 frames at 1 fps."""
    monkeypatch.setattr("omnilong.eval.session.open_session", lambda args: pytest.fail("the model was loaded"))
    n, needles = write_needle_image(tmp_path / "n.png"), tmp_path / "set.jsonl"
    needles.write_text(json.dumps({"question": "q", "answer": "a", "image": "n.png"}) + "\n")
    argv = ["vniah", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "out")]
    argv += ["--haystack-video", str(tiny_videos_dir / "video_004.mp4"), "--frame-counts", *counts]
    argv += [a.format(n=n, set=needles) for a in needle_args]
    assert _evaluate(argv, monkeypatch) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate: error:") and message in err[0], err


def test_command_line_runs_a_needle_set(tiny_qwen_dir, tiny_videos_dir, tmp_path, monkeypatch):
    write_needle_image(tmp_path / "red.png")
    entries = [
        {"question": "What colour is the odd frame?", "answer": "red", "image": "red.png"},
        {"question": "Which colour?", "answer": "A", "image": "red.png", "options": ["red", "blue"]},
    ]
    (tmp_path / "set.json").write_text(json.dumps(entries))
    argv = ["vniah", "--checkpoint", str(tiny_qwen_dir), "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", "2"]
    argv += ["--output", str(tmp_path / "out"), "--haystack-video", str(tiny_videos_dir / "video_005.mp4")]
    argv += ["--needles", str(tmp_path / "set.json"), "--frame-counts", "2", "6", "--depths", "0.5", "--fps", "2"]
    assert _evaluate(argv, monkeypatch) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (results["items"], results["haystack_fps"], len(results["needles"])) == (4, 2.0, 2)
    assert results["needles"][1]["options"] == {"A": "red", "B": "blue"}


def _first_logits(model, family, prompt):
    steps = cached_logits(model, family.prompt_inputs(prompt)[0])
    logits = next(steps)
    steps.close()
    return logits


def test_cached_haystack_features_equal_fresh_encoding(family_inference, tiny_videos_dir, tmp_path):
    loaded, family = family_inference
    step = family.frames_per_step
    haystack = decode_video(tiny_videos_dir / "video_002.mp4", 1.0, 4)  # 3 s: frames at 0, 1, 2 s
    frames = haystack.frames[:2]
    hay = [f"hay{j}" for j in range(2 // step)]  # Qwen2.5-VL: one frame pair, LLaVA-OneVision: two frames
    needle = read_image(write_needle_image(tmp_path / "needle.png"))
    with family.frame_feature_cache(loaded.model) as cache:
        for depth, keys in ((0.0, ["needle", *hay]), (1.0, [*hay, "needle"])):
            video, _ = insert_needle(frames, needle, depth, step)
            prompt = Prompt("What colour?", video=DecodedVideo(video, haystack.fps))
            cache.expect(keys)
            cached = _first_logits(loaded.model, family, prompt)
            torch.testing.assert_close(cached, _first_logits(loaded.model, family, prompt), atol=1e-5, rtol=0)
        # needle and haystack steps once in all, each uncached forward all of them again
        assert cache.encoded == (1 + len(hay)) + 2 * (1 + len(hay))


def test_run_writes_the_frames_depth_grid(family_inference, tiny_videos_dir, tmp_path):
    loaded, family = family_inference
    step = family.frames_per_step
    needle = make_needle(
        "What colour is the odd frame?", "red", read_image(write_needle_image(tmp_path / "n.png")), "n"
    )
    summary = run_vniah(
        loaded, family, tmp_path / "out", tiny_videos_dir / "video_004.mp4", [needle], [2, 4], [0.0, 0.5, 1.0], 2
    )
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    # int(depth * N) down to the step boundary (Qwen2.5-VL: a pair boundary, 0.5 of one pair -> 0).
    middle = {2: 0, 1: 1}[step]
    assert [(r["frames"], r["needle_frame"]) for r in records] == [(2, 0), (2, middle), (2, 2), (4, 0), (4, 2), (4, 4)]
    # The haystack is encoded once per frame count: (2 frames + needle) + (4 frames + needle) in steps.
    assert summary["frame_steps_encoded"] == (2 // step + 1) + (4 // step + 1)
    assert summary["grids"]["generation"]["rows"] == [2, 4]
    assert all(r["generation_correct"] == r["answer"].lstrip().startswith("red") for r in records)
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == summary
