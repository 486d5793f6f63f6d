"""Tiny evaluation data for the demo and the tests, generated locally: a needle image and a
Video-MME-shaped folder over the tiny videos of ``tools/make_tiny_videos.py``."""

import json
import shutil
from pathlib import Path

import torch

_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (230, 210, 40)}


def write_needle_image(path: Path, colour: str = "red", size: int = 56) -> Path:
    """A PNG of one colour (``size x size``): V-NIAH's tiny needle ("What colour is ...?")."""
    from torchcodec.encoders import PngEncoder

    image = torch.tensor(_COLOURS[colour], dtype=torch.uint8)[:, None, None].expand(3, size, size).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    PngEncoder(image).to_file(path)
    return path


def write_tiny_videomme(root: Path, videos_dir: Path, n_videos: int = 2) -> Path:
    """A Video-MME-shaped folder: ``videomme/test-00000-of-00001.parquet`` with two questions
    per video (answers from the tiny videos' own train.jsonl; ``n_videos <= 4``, the four
    colours the options name), ``data/<videoID>.mp4`` and one subtitle file
    (``subtitle/<first id>.srt``: one cue at the start, one between frames)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not 1 <= n_videos <= len(_COLOURS):
        raise ValueError(f"n_videos must be 1..{len(_COLOURS)} (the tiny videos of the four colours the options name)")
    samples = [json.loads(line) for line in (videos_dir / "train.jsonl").read_text().splitlines()][:n_videos]
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "videomme").mkdir(exist_ok=True)
    (root / "subtitle").mkdir(exist_ok=True)
    letters = list(_COLOURS)
    rows = []
    for i, sample in enumerate(samples):
        video_id = f"tiny{i:03d}"
        shutil.copy(videos_dir / sample["video"], root / "data" / f"{video_id}.mp4")
        turns = sample.get("messages") or [{"content": t["value"]} for t in sample["conversations"]]
        colour = next(c for c in _COLOURS if c in turns[1]["content"])  # "The square is <colour>."
        for j, duration in enumerate(("short", "medium")):
            rows.append(
                {
                    "video_id": str(i),
                    "duration": duration if i == 0 else "long",
                    "domain": "Knowledge",
                    "sub_category": "Technology",
                    "url": "",
                    "videoID": video_id,
                    "question_id": f"{i:03d}-{j + 1}",
                    "task_type": "Attribute Perception" if j == 0 else "Counting Problem",
                    "question": "What colour is the square?",
                    "options": [f"{'ABCD'[k]}. {name}" for k, name in enumerate(letters)],
                    "answer": "ABCD"[letters.index(colour)],
                }
            )
    pq.write_table(pa.Table.from_pylist(rows), root / "videomme" / "test-00000-of-00001.parquet")
    (root / "subtitle" / "tiny000.srt").write_text(
        '1\n00:00:00,000 --> 00:00:00,900\n<font color="white" size=".72c">a square appears</font>\n\n'
        "2\n00:00:01,010 --> 00:00:01,020\nbetween two frames\n"
    )
    return root
