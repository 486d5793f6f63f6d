"""Write tiny evaluation data: a needle image for V-NIAH and a Video-MME-shaped folder over the
tiny videos of tools/make_tiny_videos.py (nothing is downloaded).

    python tools/make_tiny_eval_data.py --videos outputs/tiny-videos --output outputs/tiny-eval
"""

import argparse
from pathlib import Path

from omnilong.testing.tiny_eval_data import write_needle_image, write_tiny_videomme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", required=True, type=Path, help="output folder of tools/make_tiny_videos.py")
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args()
    needle = write_needle_image(args.output / "needle.png")
    root = write_tiny_videomme(args.output / "videomme", args.videos)
    print(f"{needle} and the Video-MME-shaped folder {root} written")


if __name__ == "__main__":
    main()
