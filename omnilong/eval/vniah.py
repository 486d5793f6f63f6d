"""Visual needle in a haystack (V-NIAH).

A haystack video (a local file) is sampled at ``fps`` (1 by default) and cut to its first N
frames for each N asked; a needle image (a local image file, or any ``[3, H, W]`` uint8
tensor) is resized to the haystack's frame size and inserted as a video frame at relative
depths 0..1, and its question is asked after the video. The needle goes in as the model's
whole encoding step (``family.frames_per_step`` copies at a multiple of it: Qwen2.5-VL's
two-frame temporal patch, so the needle never shares a patch with a haystack frame; one frame
for a per-frame encoder); the haystack is first trimmed to a multiple of the step. Positions
follow the model's rule (Qwen2.5-VL: M-RoPE time of every frame pair from the video's fps).
The haystack's features are encoded once per N and reused across depths
(``family.frame_feature_cache``).

Scores per item: teacher forcing of ``answer`` and a greedy answer containing ``answer``
(case-insensitive). Output: ``results.jsonl``, ``results.json`` (frames x depth grids) and
``heatmap.png``.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2.functional as tvF

from omnilong.data.video import DecodedVideo, decode_video
from omnilong.eval.ask import generate_answer, reproduces_answer
from omnilong.eval.family import ModelFamily, Prompt
from omnilong.eval.groups import GroupResults
from omnilong.eval.report import grid_accuracy, write_heatmaps, write_json
from omnilong.generation.loading import InferenceModel


def insert_needle(frames: torch.Tensor, needle: torch.Tensor, depth: float, step: int) -> tuple[torch.Tensor, int]:
    """``frames [T, 3, H, W]`` (T a multiple of ``step``) with ``step`` copies of ``needle``
    (resized to ``H x W``) inserted at the step boundary nearest ``depth * T``.

    Returns:
        ``([T + step, 3, H, W], index of the first needle frame)``.
    """
    index = round(depth * frames.shape[0] / step) * step
    needle = tvF.resize(needle, list(frames.shape[-2:]), antialias=True)[None].expand(step, -1, -1, -1)
    return torch.cat([frames[:index], needle, frames[index:]]), index


def run_vniah(
    loaded: InferenceModel,
    family: ModelFamily,
    output_dir: Path,
    haystack_video: Path,
    needle: torch.Tensor,
    question: str,
    answer: str,
    frame_counts: Sequence[int],
    depths: Sequence[float],
    max_new_tokens: int = 16,
    generate: bool = True,
) -> dict[str, Any]:
    """Run V-NIAH over ``frame_counts x depths``; writes ``results.jsonl``, ``results.json`` and
    ``heatmap.png`` into ``output_dir`` (rank 0; every rank computes).

    Raises:
        ValueError: a depth outside 0..1, or a frame count below one encoding step.
    """
    step = family.frames_per_step
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths must lie in 0..1, got {list(depths)}")
    if min(frame_counts) < step:
        raise ValueError(f"frame counts must be >= {step} (one encoding step of the model), got {list(frame_counts)}")
    haystack = decode_video(haystack_video, family.video_options.fps, max(frame_counts))
    results = GroupResults(loaded, output_dir / "results.jsonl", resume=False)
    items = [(n, d) for n in frame_counts for d in depths]
    with family.frame_feature_cache(loaded.model) as cache:
        for count, depth in results.run(items, "V-NIAH", cost=lambda item: item[0]):
            frames = haystack.frames[:count]
            frames = frames[: frames.shape[0] - frames.shape[0] % step]
            video, index = insert_needle(frames, needle, depth, step)
            keys = [("haystack", count, j) for j in range(index // step)] + [("needle", count)]
            keys += [("haystack", count, j) for j in range(index // step, frames.shape[0] // step)]
            prompt = Prompt(question, video=DecodedVideo(video, haystack.fps))
            record: dict[str, Any] = {
                "frames": count,
                "haystack_frames": frames.shape[0],
                "depth": float(depth),
                "needle_frame": index,
            }
            cache.expect(keys)
            record["forced_correct"] = reproduces_answer(loaded, family, prompt, answer)
            if generate:
                cache.expect(keys)
                text, record["tokens"] = generate_answer(loaded, family, prompt, max_new_tokens)
                record.update(answer=text, generation_correct=answer.lower() in text.lower())
            results.write(record)
        encoded = results.total(cache.encoded)  # over the groups
    records = results.finish()  # every group's, in item order
    scores = ["forced_correct"] + (["generation_correct"] if generate else [])
    summary = {
        "evaluation": "vniah",
        "items": len(records),
        "haystack_video": str(haystack_video),
        "haystack_fps": haystack.fps,
        "frame_counts": list(frame_counts),
        "depths": list(depths),
        "frame_steps_encoded": encoded,
        **{f"accuracy_{s.removesuffix('_correct')}": sum(r[s] for r in records) / len(records) for s in scores},
        "grids": {s.removesuffix("_correct"): grid_accuracy(records, "frames", "depth", s) for s in scores},
    }
    if loaded.is_main:
        write_json(output_dir / "results.json", summary)
        write_heatmaps(
            output_dir / "heatmap.png",
            {f"V-NIAH ({name})": grid for name, grid in summary["grids"].items()},
            "haystack frames",
            "needle depth",
        )
    return summary
