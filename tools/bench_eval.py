"""Evaluation speed: measured on the tiny model for each layout of the ranks, predicted for the
7B Video-MME full run on eight GPUs.

Measured: ``tools/evaluate.py videomme`` as a user runs it (fp32, CPU, ``--max-frames 8``, both
subtitle settings) on a Video-MME-shaped folder of ``--videos`` tiny generated videos with
three questions each, under each layout: one process, ``--nproc`` groups of one rank, one cp
group of ``--nproc`` ranks. The rate is the one the loop logs in each group's last progress
line (items done / seconds since the group's loop began: model loading and start-up left out);
the job's rate is the sum over groups, per rank that sum divided by the ranks. Wall is the whole
command. One run per layout, the machine maybe shared: compare layouts within one run only.

Predicted (no GPU needed): the 7B Video-MME (900 videos, 2,700 questions, both subtitle
settings: 5,400 prompts) with the README's command (``--fps 1 --max-frames 768
--video-total-pixels 90316800``) on eight GPUs as eight groups of one rank (``--cp-degree 1``:
the longest prompt, ~114K tokens, should fit one GPU in inference: 15 GiB of weights, 6.5 GiB
of KV cache, one layer's MLP intermediates ~13 GiB; not measured. ``--cp-degree 2`` gives the
same FLOPs on four groups). Method:

1. Tokens per prompt, per duration bucket: each bucket's mean video length from the Video-MME
   paper (short 80.8 s, medium 515.8 s, long 2,466.7 s; 300 videos each), frames at 1 fps up to
   768, a 1280x720 source (the dry run's assumption) sized by the family's own rules
   (:func:`omnilong.data.video.shape_sizes`, :func:`~omnilong.data.video.num_video_tokens`);
   plus ``--text-tokens`` (question, options, instruction, chat template) and, with subtitles,
   ``--subtitle-tokens-per-minute`` of video when every cue is kept, scaled by
   ``min(1, 3 s x sampled fps)`` (a cue of ~3 s is kept when a sampled frame falls in it).
2. FLOPs per prompt, from the model's shapes (``omnilong.models.named``: qwen2.5-vl-7b):
   the LLM's prefill, ``2 x`` its non-embedding weights per token plus ``4 x heads x head_dim``
   per causal query-key pair per layer; the answer's ``--max-new-tokens`` decode steps at
   ``2 x`` weights each; the vision tower once per video (a video's questions share its
   features: one group, the frame feature cache), ``2 x`` block weights per patch, attention
   pairs within windows (``window_size``) or the whole frame pair (full-attention blocks), and
   the merger per LLM token.
3. The formula checked against the dry run, which counts the FLOPs of the real code
   (``omnilong/dry_run/flops.py``, PyTorch's formulas on fake tensors): the stage-3 training
   step of ``configs/qwen2_5_vl_7b/stage3_video_sft`` (per rank two rows of 131,072 tokens over
   cp 4, each with a 768-frame 588x336 video: 96,768 vision tokens) is ``4 x`` the forward
   (forward, recompute, backward at twice the forward) plus the loss's output projection
   (``3 x 2 x hidden x vocab`` per trained token); the dry run found 11,292 TFLOP per rank per
   step (README table, 2026-12-04). The ratio printed scales the prediction.
4. Time = FLOPs / (GPUs x bf16 peak x MFU), the dry run's GPU table and MFU assumption (0.4 of
   989 TFLOP/s); the groups balanced (videos dealt round robin over a release sorted by
   duration). Plus CPU decoding, from DESIGN.md's one measurement (a 10-minute 720p video at
   the stage-3 settings: 22 s for 600 frames) scaled by frames, one video at a time per group,
   not overlapped with the GPU work (as the loop runs today).

Usage:
    python tools/bench_eval.py [--videos 8] [--nproc 2] [--skip-measure]
"""

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omnilong.data.video import Patching, VideoOptions, num_video_tokens, shape_sizes
from omnilong.dry_run.report import DryRunSettings
from omnilong.memory_plan import GPUS
from omnilong.models.named import named_model_config

TOOLS = Path(__file__).resolve().parent
_RATE = re.compile(r"Video-MME(?: \[group \d+/\d+\])?: (\d+)/(\d+) items \(100%\), ([0-9.e+]+) items/s")

# Video-MME (Fu et al. 2024, Table 1): mean duration in seconds of its 300 videos per bucket.
VIDEOMME_DURATIONS = {"short": 80.8, "medium": 515.8, "long": 2466.7}
VIDEOMME_QUESTIONS_PER_VIDEO = 3
# The dry run of configs/qwen2_5_vl_7b/stage3_video_sft on 8 ranks (README, 2026-12-04).
DRY_RUN_STAGE3 = {"tflop_per_rank_step": 11_292, "row_tokens": 131_072, "rows_per_rank": 2, "cp": 4}
DRY_RUN_STAGE3_VIDEO = (768, 336, 588)  # frames, height, width: 96,768 vision tokens
DECODE_SECONDS_PER_FRAME = 22.0 / 600  # DESIGN.md: 10-minute 720p video at 1 fps, stage-3 settings


# ---------------------------------------------------------------- measured on the tiny model
def _write_bench_videomme(root: Path, videos_dir: Path, n_videos: int) -> Path:
    """``root/data/bench<k>.mp4`` (the tiny videos reused) and ``questions.jsonl`` with three
    questions per video; returns the questions file."""
    sources = sorted(videos_dir.glob("video_*.mp4"))
    (root / "data").mkdir(parents=True)
    rows = []
    for k in range(n_videos):
        shutil.copy(sources[k % len(sources)], root / "data" / f"bench{k:03d}.mp4")
        for j in range(VIDEOMME_QUESTIONS_PER_VIDEO):
            rows.append(
                {
                    "videoID": f"bench{k:03d}",
                    "question_id": f"{k:03d}-{j + 1}",
                    "duration": "short",
                    "domain": "Knowledge",
                    "task_type": "Counting Problem",
                    "question": f"Question {j + 1}: what colour is the square?",
                    "options": ["A. red", "B. green", "C. blue", "D. yellow"],
                    "answer": "A",
                }
            )
    path = root / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _measure(command: list[str], env: dict[str, str]) -> tuple[float, list[tuple[int, float]]]:
    """Wall seconds of ``command`` and ``(items, items/s)`` of each group's last progress line."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    groups = [(int(m[1]), float(m[3])) for m in _RATE.finditer(done.stderr)]
    return wall, groups


def measure(n_videos: int, nproc: int) -> None:
    import os

    from omnilong.testing.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny_qwen2_5_vl(tmp / "model", seed=0)
        subprocess.run(
            [sys.executable, str(TOOLS / "make_tiny_videos.py"), "--output", str(tmp / "videos")], check=True
        )
        questions = _write_bench_videomme(tmp / "videomme", tmp / "videos", n_videos)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        items = n_videos * VIDEOMME_QUESTIONS_PER_VIDEO * 2
        print(f"tiny Qwen2.5-VL, Video-MME-shaped: {n_videos} videos x 3 questions x 2 settings = {items} items")
        print(f"{'layout':<28}{'ranks':>6}{'wall s':>9}{'items/s':>10}{'items/s/rank':>14}")
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        layouts = {
            "1 process": ([sys.executable], [], 1),
            f"{nproc} groups of 1 rank": (torchrun, ["--cp-degree", "1"], nproc),
            f"1 group of {nproc} cp ranks": (torchrun, ["--cp-degree", str(nproc)], nproc),
        }
        for name, (launcher, extra, ranks) in layouts.items():
            out = tmp / "out" / name.replace(" ", "_")
            command = [
                *launcher,
                str(TOOLS / "evaluate.py"),
                "videomme",
                *("--checkpoint", str(model), "--dtype", "fp32", "--device", "cpu", "--max-frames", "8"),
                *("--root", str(tmp / "videomme"), "--questions", str(questions), "--output", str(out)),
                *extra,
            ]
            wall, groups = _measure(command, env)
            assert sum(n for n, _ in groups) == items, f"{name}: progress lines {groups}"
            rate = sum(r for _, r in groups)
            print(f"{name:<28}{ranks:>6}{wall:>9.1f}{rate:>10.2f}{rate / ranks:>14.2f}")


# ---------------------------------------------------------------- predicted for the 7B
def _llm_weights(c: dict[str, Any]) -> int:
    """Non-embedding weights of the decoder layers (matrices only)."""
    d, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    kv_dim = kv * d // heads
    return c["num_hidden_layers"] * (2 * d * d + 2 * d * kv_dim + 3 * d * c["intermediate_size"])


def llm_forward_flops(c: dict[str, Any], tokens: int) -> float:
    """Prefill of ``tokens`` tokens: weights and causal attention."""
    pairs = tokens * (tokens + 1) / 2
    return 2 * _llm_weights(c) * tokens + 4 * c["hidden_size"] * pairs * c["num_hidden_layers"]


def vision_flops(c: dict[str, Any], frames: int, height: int, width: int) -> float:
    """The vision tower over one video: blocks per patch, attention in windows or whole frame
    pairs, and the merger per LLM token."""
    v = c["vision_config"]
    d, p, m = v["hidden_size"], v["patch_size"], v["spatial_merge_size"]
    per_pair = (height // p) * (width // p)
    patches = -(-frames // v["temporal_patch_size"]) * per_pair
    window = min((v["window_size"] // p) ** 2, per_pair)
    full = len(v["fullatt_block_indexes"])
    blocks = 2 * v["depth"] * (4 * d * d + 3 * d * v["intermediate_size"]) * patches
    attention = 4 * d * patches * ((v["depth"] - full) * window + full * per_pair)
    merged = d * m * m
    merger = 2 * (merged * merged + merged * v["out_hidden_size"]) * patches // (m * m)
    return blocks + attention + merger


def _video(duration: float, options: VideoOptions) -> tuple[int, int, int, int]:
    """``(frames, height, width, tokens)`` of a 1280x720 video of ``duration`` seconds."""
    frames = min(options.max_frames, max(1, math.floor(duration * options.fps)))
    frames += frames % 2
    (height, width) = shape_sizes([(frames, 720, 1280)], options)[0]
    return frames, height, width, num_video_tokens(frames, height, width, Patching())


def predict(args: argparse.Namespace) -> None:
    c = named_model_config("qwen2.5-vl-7b")
    options = VideoOptions(1.0, 768, 128 * 28 * 28, 768 * 28 * 28, 90_316_800)
    settings = DryRunSettings(world_size=8)
    gpu = GPUS[args.gpu]
    # 3. the formula against the dry run's FlopCount
    frames, height, width = DRY_RUN_STAGE3_VIDEO
    row, vision_tokens = DRY_RUN_STAGE3["row_tokens"], num_video_tokens(frames, height, width, Patching())
    forward = llm_forward_flops(c, row) + vision_flops(c, frames, height, width)
    loss = 3 * 2 * c["hidden_size"] * c["vocab_size"] * (row - vision_tokens)
    train = DRY_RUN_STAGE3["rows_per_rank"] * (4 * forward + loss) / DRY_RUN_STAGE3["cp"]
    scale = DRY_RUN_STAGE3["tflop_per_rank_step"] * 1e12 / train
    print(
        f"\nformula vs dry run, stage-3 step per rank: {train / 1e12:,.0f} vs {DRY_RUN_STAGE3['tflop_per_rank_step']:,} "
        f"TFLOP (dry run / formula = {scale:.3f}; the prediction is scaled by it)"
    )
    # 1-2. Video-MME
    decode = 2 * _llm_weights(c) * args.max_new_tokens
    total_flops = decode_s = 0.0
    print(
        f"{'bucket':<8}{'frames':>7}{'frame':>10}{'video tok':>10}{'prompt tok (no subs / subs)':>30}{'TFLOP/video':>12}"
    )
    for bucket, duration in VIDEOMME_DURATIONS.items():
        frames, height, width, tokens = _video(duration, options)
        rate = frames / duration
        subs = round(args.subtitle_tokens_per_minute * duration / 60 * min(1.0, 3 * rate))
        prompts = [tokens + args.text_tokens, tokens + args.text_tokens + subs]
        per_video = vision_flops(c, frames, height, width) + VIDEOMME_QUESTIONS_PER_VIDEO * sum(
            llm_forward_flops(c, t) + decode for t in prompts
        )
        total_flops += 300 * per_video
        decode_s += 300 * frames * DECODE_SECONDS_PER_FRAME
        print(
            f"{bucket:<8}{frames:>7}{f'{height}x{width}':>10}{tokens:>10,}{f'{prompts[0]:,} / {prompts[1]:,}':>30}"
            f"{per_video / 1e12:>12,.0f}"
        )
    seconds = scale * total_flops / (args.gpus * gpu.bf16_tflops * 1e12 * settings.mfu)
    with_decode = seconds + decode_s / args.gpus
    print(
        f"Video-MME 7B, 5,400 prompts: {scale * total_flops / 1e15:,.0f} PFLOP; on {args.gpus} x {gpu.name} as "
        f"{args.gpus} groups at {settings.mfu:.0%} MFU: {seconds / 3600:.2f} h of GPU work, "
        f"{with_decode / 3600:.2f} h with CPU decoding ({decode_s / args.gpus / 3600:.2f} h per group, not overlapped)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=8, help="tiny videos (3 questions each) to measure on")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the multi-process layouts")
    parser.add_argument("--skip-measure", action="store_true", help="only the 7B prediction")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu", default="h100", choices=tuple(GPUS))
    parser.add_argument("--text-tokens", type=int, default=150, help="prompt tokens besides video and subtitles")
    parser.add_argument("--subtitle-tokens-per-minute", type=float, default=200.0)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    if not args.skip_measure:
        measure(args.videos, args.nproc)
    predict(args)


if __name__ == "__main__":
    main()
