"""Command-line plumbing shared by ``tools/generate.py`` and ``tools/evaluate.py``: the model
flags, the process group under torchrun (the ranks in data-parallel groups of ``--cp-degree``
ranks, :mod:`omnilong.eval.groups`; by default one cp group of all ranks), the loaded
checkpoint and its family."""

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from omnilong.distributed import init_distributed, resolve_device, shutdown_distributed
from omnilong.eval.family import ModelFamily, family_for
from omnilong.generation.loading import InferenceModel, load_inference_model

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint``, device/dtype and the video sampling flags."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="Hugging Face model directory or a training step folder (output_dir/checkpoints/step_N)",
    )
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the checkpoint's / its base's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="bf16", choices=tuple(_DTYPES))
    parser.add_argument("--fps", type=float, default=1.0, help="video frames sampled per second (default 1)")
    parser.add_argument("--max-frames", type=int, default=768, help="most frames per video (default 768)")
    parser.add_argument(
        "--video-min-pixels", type=int, help="least pixels per frame (Qwen2.5-VL; default: the processor's)"
    )
    parser.add_argument(
        "--video-max-pixels", type=int, help="most pixels per frame (Qwen2.5-VL; default: the processor's)"
    )
    parser.add_argument(
        "--video-total-pixels", type=int, help="pixel budget of all frames of a video (Qwen2.5-VL; default: none)"
    )


def add_group_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cp-degree``: the ranks of each data-parallel group of an evaluation."""
    parser.add_argument(
        "--cp-degree",
        type=int,
        help="under torchrun: ranks per context-parallel group, each group a model copy answering its "
        "share of the items; enough ranks for the longest input (default: all ranks one group)",
    )


def open_session(args: argparse.Namespace, cp_degree: int | None = None) -> tuple[InferenceModel, ModelFamily]:
    """Load ``args.checkpoint`` (under torchrun with several processes: in groups of
    ``cp_degree`` ranks, default all of them one cp group) and its family."""
    device = resolve_device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_distributed(device)
    loaded = load_inference_model(args.checkpoint, device, _DTYPES[args.dtype], args.tokenizer, cp_degree)
    family = family_for(
        loaded.hf_config.get("model_type"),
        loaded.tokenizer,
        loaded.model_dir,
        fps=args.fps,
        max_frames=args.max_frames,
        video_min_pixels=args.video_min_pixels,
        video_max_pixels=args.video_max_pixels,
        video_total_pixels=args.video_total_pixels,
    )
    return loaded, family


def close_session(loaded: InferenceModel) -> None:
    """Shut the process group down (when there is one)."""
    if dist.is_initialized():
        shutdown_distributed(loaded.meshes.world if loaded.meshes is not None else None)
