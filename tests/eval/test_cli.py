"""``tools/evaluate.py`` and ``tools/generate.py`` as users call them, run in-process (their
``main()`` with the argument list): each evaluation writes its results, a bad checkpoint is
one line on stderr with exit status 1; both model families (the checkpoint's ``model_type``
picks the family)."""

import builtins
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from omnilong.testing.tiny_eval_data import write_needle_image, write_tiny_videomme

TOOLS = Path(__file__).resolve().parents[2] / "tools"
CHECKPOINTS = ["tiny_qwen_dir", "tiny_llava_dir"]  # fixtures: a Qwen2.5-VL and a LLaVA-OneVision checkpoint


def _main(name: str, argv: list[str], monkeypatch) -> int:
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [name, *argv])
    return module.main()


def _model_args(checkpoint: Path, max_new_tokens: int) -> list[str]:
    """The tools' model arguments: ``checkpoint`` in fp32 on the CPU (``--checkpoint`` first)."""
    return [
        "--checkpoint",
        str(checkpoint),
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--max-new-tokens",
        str(max_new_tokens),
    ]


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_each_evaluation_writes_results(checkpoint, tiny_videos_dir, tmp_path, monkeypatch, capsys, request):
    model = _model_args(request.getfixturevalue(checkpoint), max_new_tokens=2)
    needle = write_needle_image(tmp_path / "needle.png")
    root = write_tiny_videomme(tmp_path / "videomme", tiny_videos_dir)
    runs = {
        "niah": ["--lengths", "128", "--depths", "0", "1"],
        "vniah": [
            "--haystack-video",
            str(tiny_videos_dir / "video_004.mp4"),
            "--needle-image",
            str(needle),
            "--question",
            "What colour?",
            "--answer",
            "red",
            "--frame-counts",
            "2",
            "--depths",
            "0.5",
        ],
        "videomme": ["--root", str(root), "--max-frames", "4", "--subtitles", "with", "--limit", "2"],
    }
    for evaluation, argv in runs.items():
        out = tmp_path / evaluation
        assert _main("evaluate", [evaluation, *model, "--output", str(out), *argv], monkeypatch) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["evaluation"] == evaluation
    assert json.loads((tmp_path / "videomme" / "results.json").read_text())["with_subtitles"]["questions"] == 2
    assert f"results: {tmp_path / 'videomme' / 'results.json'}" in capsys.readouterr().out


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_generate_answers_and_bad_checkpoint_is_one_line(
    checkpoint, tiny_videos_dir, tmp_path, monkeypatch, capsys, request
):
    argv = [
        *_model_args(request.getfixturevalue(checkpoint), max_new_tokens=3),
        "--image",
        str(write_needle_image(tmp_path / "needle.png")),
        "--video",
        str(tiny_videos_dir / "video_000.mp4"),
        "--text",
        "What colour is the square?",
    ]
    assert _main("generate", argv, monkeypatch) == 0
    assert "prompt tokens]" in capsys.readouterr().err
    argv[1] = str(tmp_path)
    assert _main("generate", argv, monkeypatch) == 1
    err = capsys.readouterr().err
    assert err.startswith("generate: error:") and "not a checkpoint" in err and len(err.splitlines()) == 1


def test_missing_needle_image_is_named(tiny_qwen_dir, tiny_videos_dir, tmp_path, monkeypatch, capsys):
    argv = [
        "vniah",
        "--checkpoint",
        str(tiny_qwen_dir),
        "--output",
        str(tmp_path / "out"),
        "--haystack-video",
        str(tiny_videos_dir / "video_004.mp4"),
        "--needle-image",
        str(tmp_path / "none.png"),
        "--question",
        "q",
        "--answer",
        "a",
    ]
    assert _main("evaluate", argv, monkeypatch) == 1
    assert "none.png: image not found" in capsys.readouterr().err


def _jsonl_questions(path: Path, video_id: str) -> Path:
    fields = {"question_id": "q1", "duration": "short", "domain": "d", "task_type": "t", "question": "?"}
    path.write_text(json.dumps({"videoID": video_id, **fields, "options": ["A. a"], "answer": "A"}) + "\n")
    return path


@pytest.mark.parametrize(
    "tool, case, named",
    [
        ("generate", ["--text", "q", "--video", "{tmp}/none.mp4"], "none.mp4: video file not found"),
        ("generate", ["--text", "q", "--image", "{tmp}/none.png"], "none.png: image not found"),
        ("evaluate", ["niah", "--haystack", "{tmp}/none/*.txt"], "none/*.txt"),
        (
            "evaluate",
            [
                "vniah",
                "--haystack-video",
                "{tmp}/none.mp4",
                "--needle-image",
                "{tmp}/n.png",
                "--question",
                "q",
                "--answer",
                "a",
            ],
            "none.mp4",
        ),
        ("evaluate", ["videomme", "--root", "{tmp}"], "no questions under"),
        ("evaluate", ["videomme", "--root", "{tmp}", "--questions", "{tmp}/q.jsonl"], "1 videos missing under"),
    ],
)
def test_input_files_are_checked_before_the_model_loads(
    tool, case, named, tiny_videos_dir, tmp_path, monkeypatch, capsys
):
    """Each bad input is one line naming it, and no model is loaded (open_session would raise)."""

    def no_model(args):
        raise AssertionError("the model was loaded before the input files were checked")

    monkeypatch.setattr("omnilong.eval.session.open_session", no_model)
    _jsonl_questions(tmp_path / "q.jsonl", "absent")
    argv = [a.format(tmp=tmp_path, videos=tiny_videos_dir) for a in case]
    if tool == "evaluate":
        argv[1:1] = ["--output", str(tmp_path / "out")]
    assert _main(tool, [*argv, "--checkpoint", str(tmp_path / "model")], monkeypatch) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{tool}: error:") and named in err[0], err


@pytest.mark.parametrize("video_id", ["../secret", "/etc/passwd", "..", "sub/clip"])
def test_a_videomme_video_id_naming_a_path_is_refused(video_id, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("omnilong.eval.session.open_session", lambda args: pytest.fail("model loaded"))
    argv = ["videomme", "--root", str(tmp_path), "--questions", str(_jsonl_questions(tmp_path / "q.jsonl", video_id))]
    assert (
        _main("evaluate", [*argv, "--output", str(tmp_path / "out"), "--checkpoint", str(tmp_path)], monkeypatch) == 1
    )
    assert f"q.jsonl:1: videoID {video_id!r} is not a file name" in capsys.readouterr().err


def test_missing_ffmpeg_is_one_line_naming_the_fix(tiny_videos_dir, tmp_path, monkeypatch, capsys):
    """Without FFmpeg's shared libraries torchcodec raises a page of loader tracebacks when first
    imported; the tools (and the recipe, and prepare_data) say in one line what is missing and
    how to install it, before any model loads."""
    real_import = builtins.__import__

    def without_ffmpeg(name, *args, **kwargs):
        if name.startswith("torchcodec"):
            raise RuntimeError("Could not load libtorchcodec. Likely causes:\n  1. FFmpeg is not properly installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "torchcodec.decoders", raising=False)  # imported again, as in a new process
    monkeypatch.setattr(builtins, "__import__", without_ffmpeg)
    video = sorted(tiny_videos_dir.glob("*.mp4"))[0]
    argv = ["--text", "q", "--video", str(video), "--checkpoint", str(tmp_path / "model")]
    assert _main("generate", argv, monkeypatch) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "FFmpeg's shared libraries" in err[0] and "apt-get install ffmpeg" in err[0], err
