"""Data loading costs: stage-1 start-up by corpus size (``text``), and one stage-3 video sample
at the 7B configs' settings (``video``).

Text: prepared (memory-mapped) data against raw files, by corpus size.

Builds JSONL corpora of about 1M and 10M tokens from this Python's standard-library
sources (documents repeated to reach the size), tokenized with the tiny test tokenizer
(``tools/make_tiny_checkpoint.py``); prepares them with ``omnilong.data.prepare`` and
reports its throughput. The ~100M-token prepared corpus is written directly: the 10M
one's token files tiled 10x (tokenizing 100M tokens on the 2-core dev machine would
take minutes and measure the same throughput again).

Then, each case in a fresh subprocess: load the tokenizer, reset the resident-set
high-water mark (``/proc/self/clear_refs``), build the dataset (``prepared_text_dataset``
or ``PackedTextDataset`` on the JSONL), read 4 rows spread over it; report the
construction time, the mean time to read a row, the RSS after reading the rows and the
peak RSS above the baseline (the baseline, about 0.7 GB, is torch and transformers imported).
The child uses one torch thread, as a DataLoader worker does.
The raw path runs at 1M and 10M only (about 150 bytes per token of peak memory).

Video: a generated 1280x720 30 fps H.264 file (libx264 ``medium``, CRF 23, a keyframe every
2 s; ``testsrc2`` with temporal noise; ``--video-minutes`` long (beyond 10 minutes: a 10-minute
encoding joined to itself without re-encoding, :func:`write_bench_video`), written once into
``--video-cache``) read as one sample through the stage-3 dataset of each family, at the
settings of ``configs/<family>_7b/stage3_video_sft.yaml``'s ``dataset:`` (on the raw-file
component, same options) with the 7B ``config.json`` (``omnilong.models.named``) and the tiny
test tokenizer (only token counts matter). Each family in a fresh process with one torch
thread, as a DataLoader worker: the decode time (opening, seeking, decoding, resizing), the
processing time (the rest of the item: normalising, patching, the token row), the peak
resident memory above the baseline taken after the imports and the dataset's construction,
the frames decoded, pixel values and tokens of the item, as cp rank 0 makes it for each
``--cp`` degree (its share of the frames; the token row is whole); then the loader's time per step with the
config's ``num_workers`` (``batch_size * gradient_accumulation_steps`` samples per rank and
step, the workers decoding in parallel) against the predicted step time (``--step-seconds``:
default the dry run's "step time at 40%" of the 7B stage-3 configs on 8 GPUs, ``omnilong run
--nproc_per_node 8 --config <family>_7b/stage3_video_sft --dry-run``).

Usage:
    python tools/bench_data.py [--cases text video] [--work-dir /tmp/omnilong-bench-data]
        [--workers 2] [--max-seq-len 131072] [--video-minutes 60]
        [--video-cache ~/.cache/omnilong/bench-video] [--step-seconds 28.54 28.49] [--cp 1 2 4]
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEP = "<|endoftext|>"
REPO = Path(__file__).resolve().parents[1]
#: family -> (7B config directory, named model, dataset component on raw files)
VIDEO_FAMILIES = {
    "qwen2_5_vl": ("qwen2_5_vl_7b", "qwen2.5-vl-7b", "omnilong.data.video_sft_dataset"),
    "llava_onevision": ("llava_ov_7b", "llava-onevision-7b", "omnilong.data.llava_video_sft_dataset"),
}
#: the dry run's "step time at 40%" of each family's 7B stage-3 config on 8 GPUs (seconds)
DRY_RUN_STEP_SECONDS = {"qwen2_5_vl": 28.54, "llava_onevision": 28.49}


def _child(kind: str, tokenizer_dir: str, path: str, max_seq_len: int) -> dict:
    """One start-up in this process: construction time, RSS after 4 rows, peak above baseline."""
    import torch

    from omnilong.data import PackedTextDataset, load_tokenizer, prepared_text_dataset
    from omnilong.metrics import host_peak_memory, reset_host_peak_memory

    torch.set_num_threads(1)  # as in a DataLoader worker; on a loaded machine more threads only wait
    tokenizer = load_tokenizer(tokenizer_dir)
    baseline = reset_host_peak_memory()
    start = time.perf_counter()
    if kind == "prepared":
        dataset = prepared_text_dataset(tokenizer, path, max_seq_len, separator_token=SEP)
    else:
        dataset = PackedTextDataset(tokenizer, path, max_seq_len, separator_token=SEP)
    built = time.perf_counter() - start
    for i in range(4):
        dataset[(len(dataset) - 1) * i // 3]
    row_s = (time.perf_counter() - start - built) / 4
    peak = host_peak_memory()
    rss = reset_host_peak_memory()  # the resident set now
    return {
        "construct_s": built,
        "row_ms": row_s * 1e3,
        "rows": len(dataset),
        "baseline_mb": baseline / 2**20,
        "rss_mb": rss / 2**20,
        "peak_above_mb": (peak - baseline) / 2**20,
    }


#: the longest piece encoded: a longer file is this piece's encoding joined to itself
ENCODED_MINUTES = 10.0


def write_bench_video(cache: Path, minutes: float) -> Path:
    """A ``minutes``-long 1280x720 30 fps H.264 file in ``cache``, written once: libx264
    ``medium``, CRF 23, a keyframe every 2 s. Up to :data:`ENCODED_MINUTES` it is encoded
    whole; a longer one (a whole number of pieces) is that piece's file repeated by FFmpeg's
    concat demuxer without re-encoding (``-c copy``): the same bitstream settings and the same
    decoding work per second, in seconds instead of the hour that encoding 60 minutes takes on
    a few cores (the picture repeats every 10 minutes; timestamps run on)."""
    path = cache / f"video-{minutes:g}min-720p.mp4"
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.mp4")
    if minutes > ENCODED_MINUTES:
        pieces = minutes / ENCODED_MINUTES
        if pieces != int(pieces):
            raise SystemExit(f"--video-minutes above {ENCODED_MINUTES:g} must be a multiple of it, got {minutes:g}")
        piece = write_bench_video(cache, ENCODED_MINUTES)
        listing = cache / f"{path.stem}.concat.txt"
        listing.write_text(f"file '{piece.name}'\n" * int(pieces))
        print(f"joining {int(pieces)} copies of {piece.name} into {path} (stream copy)", flush=True)
        subprocess.run(
            ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "concat", "-safe", "0", "-i", str(listing),
             "-c", "copy", "-movflags", "+faststart", str(partial)],
            check=True,
        )  # fmt: skip
        listing.unlink()
        partial.rename(path)
        return path
    print(f"encoding {path} ({minutes:g} min; written once)", flush=True)
    subprocess.run(
        ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
         "testsrc2=size=1280x720:rate=30,noise=alls=6:allf=t", "-t", str(minutes * 60),
         "-c:v", "libx264", "-preset", "medium", "-crf", "23", "-g", "60", "-keyint_min", "60",
         "-sc_threshold", "0", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(partial)],
        check=True,
    )  # fmt: skip
    partial.rename(path)
    return path


def _video_child(family: str, video: str, work: str, cp: str, extra: list[str]) -> dict:
    """One stage-3 item of ``video`` in this process, as cp rank 0 of ``cp`` makes it (its share
    of the frames: ``decode_cp_share``): decode and processing seconds, peak RSS above the
    baseline, frames decoded, pixel values, tokens. ``extra``: ``key=value`` arguments passed on
    to the dataset component."""
    import torch
    import torchvision.transforms.v2.functional  # noqa: F401  (imported by a worker before its first item)
    import yaml
    from torchcodec.decoders import VideoDecoder  # noqa: F401

    from omnilong.config import component_from_path
    from omnilong.data import load_tokenizer
    from omnilong.data.video import SampledVideo
    from omnilong.metrics import host_peak_memory, reset_host_peak_memory
    from omnilong.models.named import named_model_config

    torch.set_num_threads(1)
    config_dir, model, component = VIDEO_FAMILIES[family]
    cfg = yaml.safe_load((REPO / "configs" / config_dir / "stage3_video_sft.yaml").read_text())
    settings = {k: v for k, v in cfg["dataset"].items() if k not in ("_component_", "sources", "packed")}
    for item in extra:  # key=value, the value read as YAML
        settings.update(yaml.safe_load(item.replace("=", ": ", 1)))
    samples = Path(work) / f"{family}.jsonl"
    question = {"from": "human", "value": "<video>\nDescribe the video."}
    samples.write_text(json.dumps({"video": video, "conversations": [question, {"from": "gpt", "value": "A test."}]}))
    dataset = component_from_path(component)(
        load_tokenizer(Path(work) / family),
        samples,
        max_seq_len=cfg["max_seq_len"],
        model_config=named_model_config(model),
        **settings,
    )
    if int(cp) > 1:
        dataset.decode_cp_share(0, int(cp))
    decode_s = 0.0
    real_decode = SampledVideo.decode

    def timed_decode(*args, **kwargs):
        nonlocal decode_s
        start = time.perf_counter()
        try:
            return real_decode(*args, **kwargs)
        finally:
            decode_s += time.perf_counter() - start

    SampledVideo.decode = timed_decode
    baseline = reset_host_peak_memory()
    start = time.perf_counter()
    item = dataset[0]
    total = time.perf_counter() - start
    peak = host_peak_memory()
    if bool(item["skipped"]):
        raise RuntimeError(f"{family}: the sample was skipped (see the log)")
    pixels = item["pixel_values_videos"]
    frames = pixels.shape[0] if pixels.dim() == 4 else pixels.shape[0] // int(item["video_grid_thw"][0, 1:].prod()) * 2
    return {
        "decode_s": decode_s,
        "process_s": total - decode_s,
        "peak_above_mb": (peak - baseline) / 2**20,
        "frames": frames,
        "pixel_values": pixels.numel(),
        "pixel_mb": pixels.numel() * pixels.element_size() / 2**20,
        "tokens": len(item["input_ids"]),
        "num_workers": cfg["num_workers"],
        "samples_per_step": cfg["batch_size"] * cfg["gradient_accumulation_steps"],
    }


def decoder_resize_difference(video: Path, size: tuple[int, int], frames: int = 32) -> dict:
    """torchcodec's decoder-side ``Resize`` (bilinear) against the processors' pixels (full-size
    decode, then bicubic antialiased resize) on ``frames`` frames sampled at 1 fps: max and mean
    absolute difference of the uint8 values and the PSNR (dB), and each path's seconds."""
    from torchcodec.decoders import VideoDecoder
    from torchcodec.transforms import Resize

    from omnilong.data.video import SampledVideo

    source = SampledVideo(video, fps=1.0, max_frames=frames)
    start = time.perf_counter()
    exact = source.decode(size).frames.float()
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    decoder = VideoDecoder(video, dimension_order="NCHW", transforms=[Resize(size)])
    fast = decoder.get_frames_played_at(seconds=source.times).data.float()
    fast_s = time.perf_counter() - start
    diff = (fast - exact).abs()
    mse = float((diff**2).mean())
    return {
        "max": float(diff.max()),
        "mean": float(diff.mean()),
        "psnr": 10 * math.log10(255**2 / mse) if mse else math.inf,
        "exact_s": exact_s,
        "decoder_s": fast_s,
        "frames": len(source.times),
    }


def bench_video(
    work: Path, video: Path, step_seconds: dict[str, float], extra: list[str], cps: tuple[int, ...] = (1, 2, 4)
) -> None:
    """Print the stage-3 video table (see the module docstring)."""
    from omnilong.testing.tiny_llava_onevision import write_tiny_llava_onevision
    from omnilong.testing.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl

    write_tiny_qwen2_5_vl(work / "qwen2_5_vl", seed=0)
    write_tiny_llava_onevision(work / "llava_onevision", seed=0)
    print(f"\nstage-3 video sample, 7B configs' settings; {video.name}; fresh process per family, 1 thread")
    print(
        f"{'family':>16} {'cp':>2} {'frames':>6} {'tokens':>7} {'pixels MB':>9} {'decode s':>8} {'process s':>9} "
        f"{'peak above baseline MB':>22} {'workers':>7} {'loader s/step':>13} {'step s':>6} {'loader/step':>11}"
    )
    for family, cp in ((family, cp) for family in VIDEO_FAMILIES for cp in cps):
        out = subprocess.run(
            [sys.executable, __file__, "--video-child", family, str(video), str(work), str(cp), *extra],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        loader = (r["decode_s"] + r["process_s"]) * r["samples_per_step"] / r["num_workers"]
        step = step_seconds[family]
        print(
            f"{family:>16} {cp:>2} {r['frames']:>6} {r['tokens']:>7,} {r['pixel_mb']:>9.0f} {r['decode_s']:>8.1f} "
            f"{r['process_s']:>9.1f} {r['peak_above_mb']:>22.0f} {r['num_workers']:>7} {loader:>13.1f} "
            f"{step:>6.2f} {loader / step:>11.2f}"
        )
    print("\ntorchcodec's decoder-side Resize (bilinear) against the processors' pixels (uint8 values)")
    print(f"{'size':>9} {'frames':>6} {'max diff':>8} {'mean diff':>9} {'PSNR dB':>7} {'exact s':>7} {'decoder s':>9}")
    for size in ((336, 588), (384, 384)):  # the Qwen 7B stage-3 frames of a 720p video; LLaVA's crop
        r = decoder_resize_difference(video, size)
        print(
            f"{size[0]:>4}x{size[1]:<4} {r['frames']:>6} {r['max']:>8.0f} {r['mean']:>9.2f} {r['psnr']:>7.1f} "
            f"{r['exact_s']:>7.1f} {r['decoder_s']:>9.1f}"
        )


def _write_corpus(path: Path, target_tokens: int, chars_per_token: float) -> None:
    """A JSONL of standard-library sources, repeated until about ``target_tokens``."""
    from omnilong.testing import python_stdlib_sources

    texts = [p.read_text(encoding="utf-8", errors="replace") for p in python_stdlib_sources()]
    budget = target_tokens * chars_per_token
    with open(path, "w") as f:
        written, i = 0, 0
        while written < budget:
            text = texts[i % len(texts)]
            f.write(json.dumps({"text": text}) + "\n")
            written, i = written + len(text), i + 1


def _chars_per_token(tokenizer_dir: Path) -> float:
    from omnilong.data import load_tokenizer
    from omnilong.testing import python_stdlib_sources

    tokenizer = load_tokenizer(tokenizer_dir)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in python_stdlib_sources(100)]
    return sum(map(len, texts)) / sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def _tile(source: Path, output: Path, times: int) -> dict:
    """A prepared text directory holding ``source``'s documents ``times`` times over."""
    import numpy as np

    from omnilong.data.prepared import PreparedWriter

    meta = json.loads((source / "meta.json").read_text())
    tokens = np.fromfile(source / "tokens.u32", dtype="<u4")
    lengths = np.diff(np.fromfile(source / "offsets.i64", dtype="<i8"))
    writer = PreparedWriter(output, "text")
    for _ in range(times):
        writer.add_stream(tokens, lengths)
    keep = ("settings", "tokenizer_fingerprint", "tokenizer_dir", "sources", "num_skipped")
    writer.commit({**{k: meta[k] for k in keep}, "command": f"tools/bench_data.py: {source} tiled {times}x"})
    return json.loads((output / "meta.json").read_text())


def _run_child(kind: str, tokenizer_dir: Path, path: Path, max_seq_len: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(tokenizer_dir), str(path), str(max_seq_len)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=("text", "video"), default=["text", "video"])
    parser.add_argument("--work-dir", default=None, help="where corpora go (default: a temporary directory, removed)")
    parser.add_argument("--workers", type=int, default=2, help="prepare processes")
    parser.add_argument("--max-seq-len", type=int, default=131072)
    parser.add_argument("--video-minutes", type=float, default=60.0, help="length of the generated video")
    parser.add_argument("--video-cache", default="~/.cache/omnilong/bench-video", help="where the video is kept")
    parser.add_argument(
        "--step-seconds",
        nargs=2,
        type=float,
        default=list(DRY_RUN_STEP_SECONDS.values()),
        metavar=("QWEN", "LLAVA"),
        help="predicted 7B stage-3 step times (default: the dry run's, see the module docstring)",
    )
    parser.add_argument(
        "--cp", type=int, nargs="+", default=[1, 2, 4], help="cp degrees: rank 0 decodes its share of the frames"
    )
    parser.add_argument("--dataset-arg", action="append", default=[], help="key=value for the video dataset")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--video-child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, tokenizer_dir, path, max_seq_len = args.child
        print(json.dumps(_child(kind, tokenizer_dir, path, int(max_seq_len))))
        return
    if args.video_child:
        family, video, work, cp, *extra = args.video_child
        print(json.dumps(_video_child(family, video, work, cp, extra)))
        return

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="omnilong-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    if "text" in args.cases:
        bench_text(work, args.workers, args.max_seq_len)
    if "video" in args.cases:
        video = write_bench_video(Path(args.video_cache).expanduser(), args.video_minutes)
        bench_video(work, video, dict(zip(DRY_RUN_STEP_SECONDS, args.step_seconds)), args.dataset_arg, tuple(args.cp))
    if args.work_dir is None:
        shutil.rmtree(work)


def bench_text(work: Path, workers: int, max_seq_len: int) -> None:
    """Print the stage-1 start-up tables (see the module docstring)."""
    from omnilong.data.prepare import prepare
    from omnilong.testing.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl

    tokenizer_dir = write_tiny_qwen2_5_vl(work / "tiny", seed=0)
    ratio = _chars_per_token(tokenizer_dir)
    prepared, raw = {}, {}
    print(f"prepare (tiny BPE tokenizer, {workers} workers, {SEP} separator)")
    print(f"{'tokens':>12} {'documents':>10} {'seconds':>8} {'tokens/s':>10}")
    for label, target in (("1M", 1_000_000), ("10M", 10_000_000)):
        raw[label] = work / f"corpus-{label}.jsonl"
        _write_corpus(raw[label], target, ratio)
        prepared[label] = work / f"prepared-{label}"
        meta = prepare(
            "text",
            raw[label],
            tokenizer_dir,
            prepared[label],
            workers=workers,
            separator_token=SEP,
            force=True,
            progress=False,
        )
        print(
            f"{meta['num_tokens']:>12,} {meta['num_documents']:>10,} {meta['prepare_seconds']:>8.1f} "
            f"{meta['num_tokens'] / meta['prepare_seconds']:>10,.0f}"
        )
    prepared["100M"] = work / "prepared-100M"
    meta = _tile(prepared["10M"], prepared["100M"], 10)
    print(f"{meta['num_tokens']:>12,} {meta['num_documents']:>10,}    (10M token files tiled 10x, not tokenized)")

    print(f"\nstart-up of one rank, max_seq_len {max_seq_len:,}; fresh process per case; 4 rows read")
    print(
        f"{'corpus':>7} {'path':>9} {'tokens':>12} {'rows':>6} {'construct s':>12} {'ms/row':>7} {'RSS MB':>7} "
        f"{'peak above baseline MB':>23}"
    )
    cases = [(label, "prepared", prepared[label]) for label in ("1M", "10M", "100M")]
    cases += [(label, "raw", raw[label]) for label in ("1M", "10M")]
    for label, kind, path in cases:
        tokens = json.loads(((prepared[label] if kind == "raw" else path) / "meta.json").read_text())["num_tokens"]
        r = _run_child(kind, tokenizer_dir, path, max_seq_len)
        print(
            f"{label:>7} {kind:>9} {tokens:>12,} {r['rows']:>6} {r['construct_s']:>12.3f} {r['row_ms']:>7.1f} "
            f"{r['rss_mb']:>7.0f} {r['peak_above_mb']:>23.1f}"
        )


if __name__ == "__main__":
    main()
