"""Answer one prompt (text, images, a video) with a checkpoint: greedy decoding with a KV cache.

    python tools/generate.py --checkpoint outputs/tiny-stage3/hf --video clip.mp4 --text "What happens?"
    python tools/generate.py --checkpoint outputs/run/checkpoints/step_300 --image a.png --text "Describe it."
    torchrun --nproc_per_node 8 tools/generate.py --checkpoint <7B dir> --video long.mp4 --text "..."

Under torchrun every process is one context-parallel rank: the prompt is prefilled with ring
attention over all of them (parameters FSDP-sharded over them), as in training.
"""

import argparse
import logging
import sys

from omnilong.data.video import DecodedVideo, FFmpegUnavailableError, decode_video, probe_video
from omnilong.eval.ask import generate_answer
from omnilong.eval.family import Prompt, read_image
from omnilong.eval.session import add_model_arguments, close_session, open_session


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--text", required=True, help="the question or instruction")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    parser.add_argument("--video", help="a video file")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    loaded = None
    try:
        images = tuple(read_image(p) for p in args.image)  # input files are checked before the model loads
        if args.video:
            probe_video(args.video, args.fps, args.max_frames)
        loaded, family = open_session(args)
        video: DecodedVideo | None = None
        if args.video:
            video = decode_video(args.video, family.video_options.fps, family.video_options.max_frames)
        prompt = Prompt(args.text, images, video)
        answer, prompt_tokens = generate_answer(loaded, family, prompt, args.max_new_tokens)
        if loaded.is_main:
            print(answer)
            print(f"[{prompt_tokens} prompt tokens]", file=sys.stderr)
    except (ValueError, FileNotFoundError, FFmpegUnavailableError) as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 1
    finally:
        if loaded is not None:
            close_session(loaded)
    return 0


if __name__ == "__main__":
    sys.exit(main())
