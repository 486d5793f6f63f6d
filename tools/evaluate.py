"""Evaluate a checkpoint: text needle in a haystack, visual needle in a haystack, Video-MME.

    python tools/evaluate.py niah --checkpoint <model> --output outputs/eval/niah \
        [--haystack 'docs/*.txt' ...] [--lengths 1024 2048 ...] [--depths 0 0.25 0.5 0.75 1]
    python tools/evaluate.py vniah --checkpoint <model> --output outputs/eval/vniah \
        --haystack-video long.mp4 --needle-image needle.png --question "..." --answer "..." \
        [--frame-counts 16 32 ...] [--depths ...]
    python tools/evaluate.py videomme --checkpoint <model> --output outputs/eval/videomme \
        --root data/Video-MME [--num-frames 64 | --fps 1 --max-frames 768] [--subtitles both|without|with]

Each writes ``results.json`` (and ``results.jsonl`` / ``answers.jsonl`` per item, a heatmap
PNG for the needle tests when matplotlib is installed) into ``--output``. Under
``torchrun --nproc_per_node N`` the processes form groups of ``--cp-degree`` context-parallel
ranks (default: one group of all N), each group answering its share of the items (a video's
questions all in one group); the groups' rows are merged into the one results file.
NIAH's haystack defaults to this Python's standard-library sources; its lengths default to
1K, 2K, 4K, ... up to the model's ``max_position_embeddings``.
"""

import argparse
import logging
import sys
from pathlib import Path

from omnilong.data.sources import expand_data_files
from omnilong.data.video import probe_video
from omnilong.eval.family import read_image
from omnilong.eval.niah import default_lengths, run_niah
from omnilong.eval.session import add_group_arguments, add_model_arguments, close_session, open_session
from omnilong.eval.videomme import read_inputs, run_videomme
from omnilong.eval.vniah import run_vniah
from omnilong.testing import python_stdlib_sources

_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="evaluation", required=True)
    niah = commands.add_parser("niah", help="text needle in a haystack")
    niah.add_argument("--haystack", nargs="+", help="text files, directories or globs (default: the stdlib sources)")
    niah.add_argument("--lengths", nargs="+", type=int, help="prompt lengths in tokens (default: 1K .. model limit)")
    niah.add_argument("--depths", nargs="+", type=float, default=_DEPTHS)
    niah.add_argument("--seed", type=int, default=0, help="seed of the needle numbers")
    vniah = commands.add_parser("vniah", help="visual needle in a haystack")
    vniah.add_argument("--haystack-video", required=True, type=Path)
    vniah.add_argument("--needle-image", required=True, type=Path)
    vniah.add_argument("--question", required=True, help="the question about the needle image")
    vniah.add_argument("--answer", required=True, help="the expected answer (generation: contained, any case)")
    vniah.add_argument("--frame-counts", nargs="+", type=int, default=[16, 32, 64, 128])
    vniah.add_argument("--depths", nargs="+", type=float, default=_DEPTHS)
    videomme = commands.add_parser("videomme", help="Video-MME from a local copy of the release")
    videomme.add_argument("--root", required=True, type=Path, help="the release folder (videomme/, data/, subtitle/)")
    videomme.add_argument("--questions", type=Path, help="questions file (default: root/videomme/*.parquet)")
    videomme.add_argument("--num-frames", type=int, help="frames evenly over each video (default: --fps sampling)")
    videomme.add_argument("--subtitles", default="both", choices=("both", "without", "with"))
    videomme.add_argument("--limit", type=int, help="only the first N questions")
    videomme.add_argument(
        "--skip-missing-videos",
        action="store_true",
        help="score without missing videos (counted in results.json) instead of stopping",
    )
    for sub, tokens in ((niah, 16), (vniah, 16), (videomme, 8)):
        add_model_arguments(sub)
        add_group_arguments(sub)
        sub.add_argument("--output", required=True, type=Path, help="directory for results.json and the rest")
        sub.add_argument("--max-new-tokens", type=int, default=tokens)
        if sub is not videomme:
            sub.add_argument("--no-generation", action="store_true", help="teacher forcing only")
    return parser


def main() -> int:
    args = _parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    loaded = None
    try:
        # input files are checked before the model loads
        if args.evaluation == "niah":
            files = expand_data_files(args.haystack) if args.haystack else python_stdlib_sources()
        elif args.evaluation == "vniah":
            probe_video(args.haystack_video, args.fps, args.max_frames)
            needle = read_image(args.needle_image)
        else:
            read_inputs(args.root, args.questions, args.limit, args.skip_missing_videos)
        loaded, family = open_session(args, args.cp_degree)
        if args.evaluation == "niah":
            lengths = args.lengths or default_lengths(loaded.model.args.max_position_embeddings)
            summary = run_niah(
                loaded,
                family,
                args.output,
                files,
                lengths,
                args.depths,
                args.seed,
                args.max_new_tokens,
                not args.no_generation,
            )
        elif args.evaluation == "vniah":
            summary = run_vniah(
                loaded,
                family,
                args.output,
                args.haystack_video,
                needle,
                args.question,
                args.answer,
                args.frame_counts,
                args.depths,
                args.max_new_tokens,
                not args.no_generation,
            )
        else:
            settings = {"both": (False, True), "without": (False,), "with": (True,)}[args.subtitles]
            summary = run_videomme(
                loaded,
                family,
                args.root,
                args.output,
                args.questions,
                settings,
                args.num_frames,
                args.max_new_tokens,
                args.limit,
                args.skip_missing_videos,
            )
        if loaded.is_main:
            for key, value in summary.items():
                if key.startswith("accuracy"):
                    print(key, value)
                elif key.endswith("subtitles"):
                    print(key, {"score": value["score"], "accuracy_all": value["accuracy_all"]})
            print(f"results: {args.output / 'results.json'}")
    except (ValueError, FileNotFoundError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    finally:
        if loaded is not None:
            close_session(loaded)
    return 0


if __name__ == "__main__":
    sys.exit(main())
