"""Write short synthetic videos and a ``train.jsonl`` of conversations about them.

Each video shows one coloured square sliding across a dark background; the questions
ask its colour and the direction it moves, answered from how the video was made, so
the tiny stage-3 demo has real, learnable data. Sizes, frame rates and durations vary
(one video has an odd frame count). Half the samples use the ShareGPT shape
(``conversations``), half the ``messages`` shape.

    python tools/make_tiny_videos.py --output outputs/tiny-videos [--count 8]
"""

import argparse
import json
from pathlib import Path

import torch

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 60, 230),
    "yellow": (230, 210, 40),
    "magenta": (210, 40, 200),
    "cyan": (40, 210, 220),
}
DIRECTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")
# (height, width, frames per second, frames): 2-6 s, small even sizes, one odd frame count.
LAYOUTS = ((56, 84, 4, 12), (84, 56, 5, 15), (56, 56, 8, 24), (56, 112, 10, 23), (84, 84, 6, 30), (56, 84, 8, 48))


def square_video(height: int, width: int, frames: int, colour: tuple[int, int, int], direction: str) -> torch.Tensor:
    """``[frames, 3, height, width]`` uint8: a square of side ``min(height, width) / 3``
    moving across a dark background from one edge to the other in ``direction``."""
    side = min(height, width) // 3
    video = torch.full((frames, 3, height, width), 24, dtype=torch.uint8)
    along_x = direction in DIRECTIONS[:2]
    forward = direction in ("left to right", "top to bottom")
    span = (width if along_x else height) - side
    for i in range(frames):
        progress = i / max(frames - 1, 1)
        offset = round((progress if forward else 1 - progress) * span)
        top, left = ((height - side) // 2, offset) if along_x else (offset, (width - side) // 2)
        video[i, :, top : top + side, left : left + side] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
    return video


def sample(name: str, colour: str, direction: str, messages_shape: bool) -> dict:
    """A two-question conversation about the video ``name``."""
    turns = [
        ("user", "<video>\nWhat colour is the square?"),
        ("assistant", f"The square is {colour}."),
        ("user", "Which way does it move?"),
        ("assistant", f"It moves from {direction}."),
    ]
    if messages_shape:
        return {"video": name, "messages": [{"role": r, "content": c} for r, c in turns]}
    return {"video": name, "conversations": [{"from": "human" if r == "user" else "gpt", "value": c} for r, c in turns]}


def write_tiny_videos(output: Path, count: int = 8) -> Path:
    """Write ``count`` videos (``video_000.mp4``, ...) and ``train.jsonl`` into ``output``.

    Returns:
        The path of ``train.jsonl``.
    """
    from torchcodec.encoders import VideoEncoder

    output.mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS)
    lines = []
    for i in range(count):
        height, width, fps, frames = LAYOUTS[i % len(LAYOUTS)]
        colour, direction = colours[i % len(colours)], DIRECTIONS[(i // 2) % len(DIRECTIONS)]
        name = f"video_{i:03d}.mp4"
        video = square_video(height, width, frames, COLOURS[colour], direction)
        VideoEncoder(video, frame_rate=fps).to_file(output / name, crf=18)
        lines.append(json.dumps(sample(name, colour, direction, messages_shape=i % 2 == 1)))
    path = output / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path, help="directory to write")
    parser.add_argument("--count", type=int, default=8, help="number of videos (default 8)")
    args = parser.parse_args()
    path = write_tiny_videos(args.output, args.count)
    print(f"{args.count} videos and {path} written")


if __name__ == "__main__":
    main()
