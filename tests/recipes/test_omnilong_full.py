"""The recipe end to end, as users run it: `tune run [--nproc_per_node N] omnilong_full ...`.

Multi-process runs are real processes on gloo (CPU).
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.recipe_runs import (
    REPO,
    SMALL_STAGE1,
    STAGE1,
    STAGE2,
    STAGE3,
    TUNE,
    assert_same_losses,
    metrics,
    recipe_run,
    refused_in_process,
)

pytestmark = pytest.mark.slow


def _small(tiny_qwen_dir, output_dir=None, **extra):
    """3 steps of 128 tokens; without ``output_dir`` for :func:`shared_run`."""
    placed = {} if output_dir is None else {"output_dir": output_dir}
    return {"checkpoint_dir": tiny_qwen_dir, **placed, **SMALL_STAGE1, **extra}


def _with_data_files(overrides, component, data):
    """Overrides that swap the config's stdlib dataset for ``component`` over ``data``."""
    overrides = {k: v for k, v in overrides.items() if k != "dataset.max_files"}
    return {
        **overrides,
        "dataset._component_": component,
        "~dataset.max_files": None,
        "dataset.data_files": f"[{data}]",
    }


def test_two_processes_with_fsdp_cpu_offload_match_one_process_with_accumulation(tiny_qwen_dir, shared_run, tmp_path):
    """Same data, seed and global batch (2 rows per step): per-step losses within 1e-4 relative.
    The one-process run (the config's 2 accumulation steps, by ``omnilong run``) is shared with
    other tests; the two processes are started by ``tune run``."""
    one = shared_run(STAGE1, _small(tiny_qwen_dir))
    two = recipe_run(
        STAGE1,
        _small(tiny_qwen_dir, tmp_path / "two", gradient_accumulation_steps=1, fsdp_cpu_offload="true"),
        nproc=2,
        launcher="tune",
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_losses(one, tmp_path / "two")
    m1, m2 = metrics(one), metrics(tmp_path / "two")
    assert [m["step"] for m in m1] == [1, 2, 3]
    for a, b in zip(m1, m2):
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(a["grad_norm"]), (a, b)
    assert set(m1[0]) >= {"step", "loss", "lr", "tokens_per_sec", "num_tokens", "grad_norm", "peak_memory_gb"}


def test_loss_falls_and_runs_from_any_directory(tiny_qwen_dir, tmp_path):
    """Through ``tune run``, on one process."""
    overrides = _small(tiny_qwen_dir, tmp_path / "out", max_steps=12, max_seq_len=256)
    result = recipe_run(STAGE1, overrides, launcher="tune", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [m["loss"] for m in metrics(tmp_path / "out")]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.3


def test_samples_without_trainable_tokens_contribute_nothing(tiny_qwen_dir, tmp_path):
    """Rank 0 gets a sample with no assistant turn in step 1; in step 2 no rank has a trainable token."""
    user_only = {"messages": [{"role": "user", "content": "hello there"}]}
    normal = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in [user_only, normal, user_only, user_only]))
    overrides = {
        "checkpoint_dir": tiny_qwen_dir,
        "output_dir": tmp_path / "out",
        "max_steps": 2,
        "batch_size": 1,
        "shuffle": "false",
        "dataset.packed": "false",
    }
    result = recipe_run(STAGE2, _with_data_files(overrides, "omnilong.data.chat_dataset", data), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(tmp_path / "out")
    assert m[0]["num_tokens"] > 0 and m[0]["loss"] > 0
    assert m[1]["num_tokens"] == 0 and m[1]["loss"] == 0.0 and m[1]["grad_norm"] == 0.0


def _assert_refused_before_compute(result, message, output_dir=None):
    """Exit status 1, one error line holding ``message``, no traceback, no data or model built."""
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "omnilong INFO: data:" not in result.stderr and "omnilong INFO: model:" not in result.stderr
    if output_dir is not None:
        assert not (Path(output_dir) / "metrics.jsonl").exists()


def test_bad_config_stops_tune_run_with_one_line(tiny_qwen_dir, tmp_path):
    """The same refusal through ``tune run``: exit status 1, one line, no traceback, nothing built."""
    result = recipe_run(STAGE1, {**_small(tiny_qwen_dir, tmp_path / "out"), "max_seq_length": 64}, launcher="tune")
    _assert_refused_before_compute(
        result, "unknown key 'max_seq_length' (did you mean 'max_seq_len'?)", tmp_path / "out"
    )


def test_unwritable_output_dir_or_checkpoints_folder_fails_before_any_compute(tiny_qwen_dir, tmp_path):
    """Tests run as root, who may write anywhere: a path under a regular file is unwritable for all."""
    (tmp_path / "file").write_text("a regular file")
    out = tmp_path / "file" / "out"
    _assert_refused_before_compute(
        recipe_run(STAGE1, _small(tiny_qwen_dir, out)), f"output_dir {out} is not writable (Not a directory"
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoints").write_text("not a folder")
    result = recipe_run(STAGE1, _small(tiny_qwen_dir, tmp_path / "out", save_every_n_steps=1))
    _assert_refused_before_compute(
        result,
        f"output_dir: checkpoints cannot be written to {tmp_path / 'out/checkpoints'} "
        "(" + str(tmp_path / "out/checkpoints") + " is not a directory)",
        tmp_path / "out",
    )


def test_malformed_jsonl_is_named_on_every_rank_without_a_hang(tiny_qwen_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n')
    overrides = _with_data_files(_small(tiny_qwen_dir, tmp_path / "out"), "omnilong.data.PackedTextDataset", data)
    result = recipe_run(STAGE1, overrides, nproc=2, timeout=120)
    assert result.returncode == 1
    assert f"{data}:3: malformed JSON line" in result.stderr
    # omnilong run ends with torchrun's table of failed ranks, not the launcher's traceback
    assert "omnilong_full FAILED" in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]


def test_ctrl_c_stops_every_rank_cleanly(tiny_qwen_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [TUNE, "run", "--nproc_per_node", "2", "omnilong_full", "--config", STAGE1] + [
        f"{k}={v}" for k, v in _small(tiny_qwen_dir, out, max_steps=100000).items()
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    output, _ = proc.communicate(timeout=60)
    assert output.count("stopped by SIGINT after step") == 1, output[-3000:]  # said by rank 0 only
    assert len(list((out / "checkpoints").glob("step_*"))) == 1  # the step it stopped at, saved
    assert "KeyboardInterrupt" not in output, output[-3000:]  # no rank died of it with a traceback
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no process of the run is left


def test_chunked_loss_trains_like_the_full_logits_loss(tiny_qwen_dir, shared_run, tmp_path):
    """The default chunked loss (the config's, in the shared run) and the full-logits reference
    give the same per-step losses (fp32)."""
    assert OmegaConf.load(STAGE1).loss._component_ == "omnilong.loss.ChunkedLinearCrossEntropy"
    full_logits = {"loss._component_": "omnilong.loss.FullLogitsCrossEntropy"}
    full = recipe_run(STAGE1, _small(tiny_qwen_dir, tmp_path / "full", **full_logits))
    assert full.returncode == 0, full.stderr[-3000:]
    runs = {
        name: [(m["loss"], m["grad_norm"]) for m in metrics(output_dir)]
        for name, output_dir in (
            ("ChunkedLinearCrossEntropy", shared_run(STAGE1, _small(tiny_qwen_dir))),
            ("FullLogitsCrossEntropy", tmp_path / "full"),
        )
    }
    for a, b in zip(runs["ChunkedLinearCrossEntropy"], runs["FullLogitsCrossEntropy"], strict=True):
        assert abs(a[0] - b[0]) <= 1e-5 * abs(b[0]) and abs(a[1] - b[1]) <= 1e-5 * abs(b[1]), (a, b)


@pytest.mark.parametrize(
    "nproc, degrees, accumulation",
    [
        (2, {"cp_degree": 2}, 1),
        (4, {"dp_shard_degree": 2, "cp_degree": 2}, 2),
        (4, {"dp_replicate_degree": 2, "cp_degree": 2}, 2),  # HSDP: replicated over 2, sharded over cp
    ],
)
def test_context_parallel_reproduces_single_process_losses(
    tiny_qwen_dir, shared_run, tmp_path, nproc, degrees, accumulation
):
    """Same data, seed and global batch; max_seq_len 250 is not a multiple of 2 * cp (padding).
    Oracle: one process with the same rows per step (shared by the layouts with the same
    accumulation); losses and gradient norms within 1e-4."""
    small = {"max_seq_len": 250, "max_steps": 2, "gradient_accumulation_steps": 1}
    one = shared_run(STAGE1, _small(tiny_qwen_dir, **{**small, "gradient_accumulation_steps": accumulation}))
    many = recipe_run(STAGE1, _small(tiny_qwen_dir, tmp_path / "cp", **degrees, **small), nproc=nproc)
    assert many.returncode == 0, many.stderr[-3000:]
    assert_same_losses(one, tmp_path / "cp")


def test_degrees_that_do_not_match_the_world_size_fail_before_compute(tiny_qwen_dir, tmp_path):
    result = recipe_run(
        STAGE1, {**_small(tiny_qwen_dir, tmp_path / "out"), "dp_shard_degree": 2, "cp_degree": 2}, nproc=2, timeout=120
    )
    assert result.returncode != 0
    assert "dp_replicate_degree * dp_shard_degree * cp_degree = 1 * 2 * 2 must equal the world size 2" in result.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def _video_run(tiny_qwen_dir, tiny_videos_dir, output_dir=None, data=None, **extra):
    """2 steps of the tiny videos; without ``output_dir`` for :func:`shared_run`."""
    placed = {} if output_dir is None else {"output_dir": output_dir}
    return {
        "checkpoint_dir": tiny_qwen_dir,
        **placed,
        "max_steps": 2,
        "shuffle": "false",
        "gradient_accumulation_steps": 1,
        "dataset.data_files": f"[{data or tiny_videos_dir / 'train.jsonl'}]",
        **extra,
    }


def _video_one_process(shared_run, tiny_qwen_dir, tiny_videos_dir, freeze_vision):
    """The one-process video run (shared), with a checkpoint after each step."""
    return shared_run(
        STAGE3, _video_run(tiny_qwen_dir, tiny_videos_dir, freeze_vision=freeze_vision, save_every_n_steps=1)
    )


@pytest.mark.parametrize("freeze_vision", ["false", "true"])
def test_video_sft_with_context_parallel_reproduces_single_process(
    tiny_qwen_dir, tiny_videos_dir, shared_run, tmp_path, freeze_vision
):
    """Stage 3 with a trained or a frozen vision tower: cp_degree=2 (frames split over the ranks,
    ring attention) gives the per-step losses and gradient norms of one process within 1e-4."""
    one = _video_one_process(shared_run, tiny_qwen_dir, tiny_videos_dir, freeze_vision)
    cp = recipe_run(
        STAGE3,
        _video_run(tiny_qwen_dir, tiny_videos_dir, tmp_path / "cp", freeze_vision=freeze_vision, cp_degree=2),
        nproc=2,
    )
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert_same_losses(one, tmp_path / "cp")
    assert all(m["num_tokens"] > 0 for m in metrics(one))


def test_a_tokenizer_whose_vision_token_ids_are_not_the_models_is_refused_before_weights(
    tiny_qwen_dir, tiny_videos_dir, tmp_path
):
    """A checkpoint whose config.json names another ``video_token_id`` than its tokenizer's
    ``<|video_pad|>``: the run stops naming both ids, before any weight is read."""
    checkpoint = shutil.copytree(tiny_qwen_dir, tmp_path / "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text())
    tokenizer_id = config["video_token_id"]
    config["video_token_id"] = tokenizer_id + 100
    (checkpoint / "config.json").write_text(json.dumps(config))
    result = recipe_run(STAGE3, _video_run(checkpoint, tiny_videos_dir, tmp_path / "out"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if "error:" in line] == [
        f"omnilong_full: error: the dataset's video_token_id {tokenizer_id} is not the model's "
        f"{tokenizer_id + 100}: use the tokenizer of the checkpoint"
    ], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "omnilong INFO: model:" not in result.stderr


def _data_with_corrupt_video(tiny_videos_dir, tmp_path, video=None):
    """The tiny videos' samples, the first one's video replaced by ``video`` (default an unreadable file)."""
    if video is None:
        video = tmp_path / "broken.mp4"
        video.write_bytes(b"\x00\x01 not a video" * 64)
    lines = (tiny_videos_dir / "train.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["video"] = str(video)
    data = tmp_path / "train.jsonl"
    data.write_text(
        "\n".join(
            [json.dumps(first)]
            + [
                json.dumps({**json.loads(line), "video": str(tiny_videos_dir / json.loads(line)["video"])})
                for line in lines[1:]
            ]
        )
        + "\n"
    )
    return data


def test_corrupt_video_is_skipped_on_every_rank_and_counted(tiny_qwen_dir, tiny_videos_dir, tmp_path):
    data = _data_with_corrupt_video(tiny_videos_dir, tmp_path)
    result = recipe_run(STAGE3, _video_run(tiny_qwen_dir, tiny_videos_dir, tmp_path / "out", data), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(tmp_path / "out")
    assert [r["num_skipped"] for r in m] == [1, 1] and all(r["loss"] > 0 for r in m)


def test_corrupt_video_without_skipping_stops_every_rank_naming_it(tiny_qwen_dir, tiny_videos_dir, tmp_path):
    data = _data_with_corrupt_video(tiny_videos_dir, tmp_path)
    result = recipe_run(
        STAGE3,
        _video_run(tiny_qwen_dir, tiny_videos_dir, tmp_path / "out", data, **{"dataset.skip_bad_samples": "false"}),
        nproc=2,
        timeout=180,
    )
    assert result.returncode != 0
    assert "broken.mp4" in result.stderr and f"{data}:1" in result.stderr


@pytest.mark.parametrize("skip", ["true", "false"])
def test_video_that_one_cp_rank_cannot_decode_is_skipped_or_refused_on_both_ranks(
    tiny_qwen_dir, tiny_videos_dir, cp_share_videos, tmp_path, skip
):
    """cp_degree=2: each rank decodes only its half of a video whose metadata reads but whose
    last frames do not decode, so only rank 1 meets the bad frames; both ranks agree, and either
    skip the sample (counted, the run goes on) or stop naming it."""
    data = _data_with_corrupt_video(tiny_videos_dir, tmp_path, cp_share_videos.parent / "corrupt_tail.mp4")
    run = _video_run(
        tiny_qwen_dir, tiny_videos_dir, tmp_path / "out", data, cp_degree=2, **{"dataset.skip_bad_samples": skip}
    )
    result = recipe_run(STAGE3, run, nproc=2, timeout=180)
    assert "cp rank 1 cannot decode its frames" in result.stderr and "cp rank 0 cannot" not in result.stderr
    if skip == "true":
        assert result.returncode == 0, result.stderr[-3000:]
        assert [r["num_skipped"] for r in metrics(tmp_path / "out")] == [1, 1]
        return
    assert result.returncode != 0
    refusal = f"omnilong_full: error: {data}:1 ({cp_share_videos.parent / 'corrupt_tail.mp4'}): a video's frames"
    assert result.stderr.count(refusal) == 2, result.stderr[-3000:]  # both ranks (their lines may interleave)


def test_corrupt_video_in_a_dataloader_worker_is_one_line_naming_it(tiny_qwen_dir, tiny_videos_dir, tmp_path):
    """With num_workers > 0 the error comes from a worker: its message, not the worker's traceback."""
    data = _data_with_corrupt_video(tiny_videos_dir, tmp_path)
    result = recipe_run(
        STAGE3,
        _video_run(
            tiny_qwen_dir,
            tiny_videos_dir,
            tmp_path / "out",
            data,
            num_workers=1,
            **{"dataset.skip_bad_samples": "false"},
        ),
        timeout=180,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"omnilong_full: error: {data}:1: " in errors[0] and "broken.mp4" in errors[0]
    assert "Traceback" not in result.stderr and "DataLoader worker" not in result.stderr


def test_frozen_vision_tower_has_no_gradients_or_optimizer_state(tiny_qwen_dir, tiny_videos_dir, shared_run):
    """freeze_vision: the checkpoint holds the tower's weights but no optimizer state for them."""
    from omnilong.checkpoint.dcp_io import read_checkpoint_metadata

    out = _video_one_process(shared_run, tiny_qwen_dir, tiny_videos_dir, "true")
    keys = read_checkpoint_metadata(out / "checkpoints/step_1").state_dict_metadata
    assert any(k.startswith("model.visual.") for k in keys)
    assert any(k.startswith("optimizer.state.layers.") for k in keys)
    assert not any(k.startswith("optimizer.state.visual.") for k in keys)


def test_a_used_output_dir_is_refused_unless_resumed_or_moved_aside(tiny_qwen_dir, tmp_path, monkeypatch, capsys):
    """The first run's metrics and checkpoints are never overwritten, resumed with another
    optimizer, or deleted: a rerun is refused, a changed resume is refused, and
    overwrite_output_dir moves the old run to <output_dir>.old-1."""
    out = tmp_path / "out"
    run = _small(tiny_qwen_dir, out, max_steps=2, save_every_n_steps=1, keep_last_n_checkpoints=1)
    assert recipe_run(STAGE1, run).returncode == 0
    first_metrics = (out / "metrics.jsonl").read_bytes()

    _assert_refused_before_compute(
        recipe_run(STAGE1, run),
        f"output_dir {out} holds another run (metrics.jsonl, checkpoints/step_2): continue it "
        "with resume_from_checkpoint=true, move it aside with overwrite_output_dir=true",
    )
    assert (
        f"this run's config differs from {out}/checkpoints/step_2/config.yaml in optimizer.lr (0.003 -> 0.0001)"
        in refused_in_process(
            STAGE1, {**run, "resume_from_checkpoint": "true", "optimizer.lr": 1e-4}, monkeypatch, capsys
        )
    )
    assert (out / "metrics.jsonl").read_bytes() == first_metrics

    moved = recipe_run(STAGE1, {**run, "overwrite_output_dir": "true", "optimizer.lr": 1e-4})
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert f"the previous run in {out} was moved to {out}.old-1" in moved.stderr
    assert (tmp_path / "out.old-1/metrics.jsonl").read_bytes() == first_metrics
    assert sorted(p.name for p in (tmp_path / "out.old-1/checkpoints").iterdir()) == ["step_2"]
    assert [m["step"] for m in metrics(out)] == [1, 2]


def test_pruning_removes_only_checkpoints_of_the_current_run(tiny_qwen_dir, tmp_path):
    """A run resumed into a folder holding another run's step_2 and step_9 keeps its own last
    checkpoint, renames the other run's step_2 it writes over and never touches step_9; a
    changed optimizer is accepted when allowed explicitly."""
    first = _small(tiny_qwen_dir, tmp_path / "first", max_steps=1, save_every_n_steps=1)
    assert recipe_run(STAGE1, first).returncode == 0
    for step in (2, 9):
        foreign = tmp_path / f"out/checkpoints/step_{step}"
        shutil.copytree(tmp_path / "first/checkpoints/step_1", foreign)
        manifest = json.loads((foreign / "manifest.json").read_text())
        (foreign / "manifest.json").write_text(json.dumps({**manifest, "run_id": "another-run"}))
    resumed = recipe_run(
        STAGE1,
        _small(
            tiny_qwen_dir,
            tmp_path / "out",
            max_steps=3,
            save_every_n_steps=1,
            keep_last_n_checkpoints=1,
            resume_from_checkpoint=tmp_path / "first/checkpoints/step_1",
            allow_config_change_on_resume="true",
            **{"optimizer.lr": 1e-4},
        ),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out/checkpoints").iterdir()) == [
        "step_2.of-run-another-run",
        "step_3",
        "step_9",
    ]


def test_samples_skipped_while_reading_count_in_num_skipped(tiny_qwen_dir, tmp_path):
    normal = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    too_long = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in [normal, too_long, normal]))
    overrides = {
        "checkpoint_dir": tiny_qwen_dir,
        "output_dir": tmp_path / "out",
        "max_steps": 1,
        "batch_size": 1,
        "max_seq_len": 64,
        "dataset.skip_bad_samples": "true",
    }
    result = recipe_run(STAGE2, _with_data_files(overrides, "omnilong.data.chat_dataset", data))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["num_skipped"] for m in metrics(tmp_path / "out")] == [1]


def test_empty_chat_file_is_named(tiny_qwen_dir, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    overrides = {"checkpoint_dir": tiny_qwen_dir, "output_dir": tmp_path / "out", "max_steps": 1}
    result = recipe_run(STAGE2, _with_data_files(overrides, "omnilong.data.chat_dataset", data), launcher="omnilong")
    assert result.returncode == 1 and f"no usable chat sample in {data}" in result.stderr
    assert "Traceback" not in result.stderr


_THREADS_AT_EXIT = """
import atexit, os

def _report():
    names = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            names.append(open(f"/proc/{os.getpid()}/task/{task}/comm").read().strip())
        except OSError:
            pass
    if "RANK" in os.environ:  # one write of the whole line: the ranks share the launcher's stderr
        line = f"rank {os.environ['RANK']} gloo threads at exit: {sorted(n for n in names if 'gloo' in n)}\\n"
        os.write(2, line.encode())

atexit.register(_report)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc (Linux)")
def test_no_communication_thread_is_left_when_the_interpreter_exits(tiny_qwen_dir, tmp_path):
    """The cause of a rare SIGABRT after a finished run ("terminate called without an active
    exception"): Gloo threads that outlive destroy_process_group are torn down with the
    interpreter. Each rank reports its Gloo threads from an atexit hook (run before the
    interpreter finalizes): none may be left. (The abort itself is too rare for a test:
    the loop of runs that checks it is in the issue note.)"""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook/sitecustomize.py").write_text(_THREADS_AT_EXIT)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hook")}
    result = recipe_run(
        STAGE1, _small(tiny_qwen_dir, tmp_path / "out", max_steps=2, max_seq_len=101, cp_degree=2), nproc=2, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(line for line in result.stderr.splitlines() if "gloo threads at exit" in line) == [
        "rank 0 gloo threads at exit: []",
        "rank 1 gloo threads at exit: []",
    ], result.stderr[-3000:]
