"""Evaluate a checkpoint: text needle in a haystack, visual needle in a haystack, Video-MME.

    python tools/evaluate.py niah --checkpoint <model> --output outputs/eval/niah \
        [--haystack 'docs/*.txt' ...] [--lengths 16000 32000 ... | --length-count 8] \
        [--depths 0 0.25 0.5 0.75 1] [--needles 5] [--restart]
    python tools/evaluate.py vniah --checkpoint <model> --output outputs/eval/vniah \
        --haystack-video long.mp4 (--needles needles.jsonl | --needle-image needle.png \
        --question "..." --answer "..." [--options ...]) [--frame-counts 16 32 ...] [--depths ...]
    python tools/evaluate.py videomme --checkpoint <model> --output outputs/eval/videomme \
        --root data/Video-MME [--num-frames 64 | --fps 1 --max-frames 768] [--subtitles both|without|with] \
        [--extraction official|lmms-eval] [--on-settings-change refuse|new-file]

Each writes ``results.json`` (and ``results.jsonl`` / ``answers.jsonl`` per item, a heatmap
PNG for the needle tests when matplotlib is installed) into ``--output``. Under
``torchrun --nproc_per_node N`` the processes form groups of ``--cp-degree`` context-parallel
ranks (default: one group of all N), each group answering its share of the items (a video's
questions all in one group); the groups' rows are merged into the one results file.
NIAH's haystack defaults to *Pride and Prejudice* (omnilong/eval/data/); its lengths default to
``--length-count`` lengths evenly spaced up to the model's ``max_position_embeddings`` less
``--max-new-tokens`` (room for the answer); a rerun into the same ``--output`` keeps the items
done with the same settings.
"""

import argparse
import logging
import sys
from pathlib import Path

from omnilong.data.sources import expand_data_files
from omnilong.data.video import FFmpegUnavailableError, probe_video
from omnilong.eval.family import read_image
from omnilong.eval.niah import DEFAULT_HAYSTACK, default_lengths, run_niah
from omnilong.eval.session import add_group_arguments, add_model_arguments, close_session, open_session
from omnilong.eval.videomme import ON_SETTINGS_CHANGE, read_inputs, run_videomme
from omnilong.eval.videomme_scoring import DEFAULT_EXTRACTION, EXTRACTIONS, duration_table
from omnilong.eval.vniah import Needle, check_frame_counts, make_needle, read_needles, run_vniah

_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="evaluation", required=True)
    niah = commands.add_parser("niah", help="text needle in a haystack")
    niah.add_argument("--haystack", nargs="+", help="text files, directories or globs (default: Pride and Prejudice)")
    niah.add_argument(
        "--lengths", nargs="+", type=int, help="prompt lengths in tokens (default: evenly spaced, see --length-count)"
    )
    niah.add_argument(
        "--length-count",
        type=int,
        default=8,
        help="the default lengths: this many, evenly spaced up to the model's limit less --max-new-tokens (8)",
    )
    niah.add_argument("--depths", nargs="+", type=float, default=_DEPTHS)
    niah.add_argument("--needles", type=int, default=5, help="needles per (length, depth) cell, averaged (5)")
    niah.add_argument("--seed", type=int, default=0, help="seed of the needle numbers")
    niah.add_argument(
        "--restart", action="store_true", help="discard the results of an earlier run in --output, not resume"
    )
    vniah = commands.add_parser("vniah", help="visual needle in a haystack")
    vniah.add_argument("--haystack-video", required=True, type=Path, help="sampled at --fps from its start")
    vniah.add_argument(
        "--needles", type=Path, help="needle set: JSON list or JSONL of question, answer, image[, options]"
    )
    vniah.add_argument("--needle-image", type=Path, help="one needle (instead of --needles): its image")
    vniah.add_argument("--question", help="one needle: the question about the needle image")
    vniah.add_argument("--answer", help="one needle: the expected answer (an option letter with --options)")
    vniah.add_argument("--options", nargs="+", help="one needle: option texts, lettered A, B, ... (multiple choice)")
    vniah.add_argument(
        "--frame-counts",
        nargs="+",
        type=int,
        default=[16, 32, 64, 128],
        help="haystack frames: the first N at --fps (--max-frames does not apply)",
    )
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
    videomme.add_argument(
        "--extraction",
        default=DEFAULT_EXTRACTION,
        choices=tuple(EXTRACTIONS),
        help="how the letter is read from a response: official (the scorer Video-MME's README links; default) "
        "or lmms-eval (the benchmark's first scorer, as lmms-eval reads it); stored responses are re-scored",
    )
    videomme.add_argument(
        "--on-settings-change",
        default="refuse",
        choices=ON_SETTINGS_CHANGE,
        help="when answers.jsonl holds answers made with other frame sampling, pixel limits, max-new-tokens "
        "or checkpoint: refuse (default; names the difference) or new-file (keeps the old as answers.<n>.jsonl)",
    )
    for sub, tokens in ((niah, 16), (vniah, 16), (videomme, 8)):
        add_model_arguments(sub)
        add_group_arguments(sub)
        sub.add_argument("--output", required=True, type=Path, help="directory for results.json and the rest")
        sub.add_argument("--max-new-tokens", type=int, default=tokens)
        if sub is not videomme:
            sub.add_argument("--no-generation", action="store_true", help="teacher forcing only")
    return parser


def _vniah_needles(args: argparse.Namespace) -> list[Needle]:
    """V-NIAH's needles: the ``--needles`` file, or the one needle of ``--needle-image``,
    ``--question``, ``--answer`` (and ``--options``)."""
    single = {"--needle-image": args.needle_image, "--question": args.question, "--answer": args.answer}
    if args.needles is not None:
        given = [flag for flag, value in {**single, "--options": args.options}.items() if value is not None]
        if given:
            raise ValueError(f"--needles replaces {', '.join(given)}: give one or the other")
        return read_needles(args.needles)
    missing = [flag for flag, value in single.items() if value is None]
    if missing:
        raise ValueError(f"give --needles FILE, or {', '.join(missing)} for one needle")
    image = read_image(args.needle_image)
    return [make_needle(args.question, args.answer, image, str(args.needle_image), args.options or ())]


def main() -> int:
    args = _parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    loaded = None
    try:
        # input files are checked before the model loads
        if args.evaluation == "niah":
            files = expand_data_files(args.haystack) if args.haystack else [DEFAULT_HAYSTACK]
        elif args.evaluation == "vniah":
            probe_video(args.haystack_video)  # the file first, then the needles, then the counts
            needles = _vniah_needles(args)
            check_frame_counts(args.haystack_video, args.fps, args.frame_counts)
        else:
            read_inputs(args.root, args.questions, args.limit, args.skip_missing_videos)
        loaded, family = open_session(args, args.cp_degree)
        if args.evaluation == "niah":
            limit = loaded.model.args.max_position_embeddings
            lengths = args.lengths or default_lengths(limit, args.max_new_tokens, args.length_count)
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
                args.needles,
                args.restart,
            )
        elif args.evaluation == "vniah":
            summary = run_vniah(
                loaded,
                family,
                args.output,
                args.haystack_video,
                needles,
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
                args.checkpoint,
                args.questions,
                settings,
                args.num_frames,
                args.max_new_tokens,
                args.limit,
                args.skip_missing_videos,
                args.extraction,
                args.on_settings_change,
            )
            if loaded.is_main:
                print(f"Video-MME score (accuracy over answered questions), extraction {args.extraction}:")
                print(duration_table(summary))
                if summary["answers_file"]["torn_last_line_dropped"]:
                    print("answers.jsonl: its torn last line was dropped and that answer made again")
        if loaded.is_main:
            for key, value in summary.items():
                if key.startswith("accuracy"):
                    print(key, value)
                elif key.endswith("subtitles"):
                    print(key, {"score": value["score"], "accuracy_all": value["accuracy_all"]})
            print(f"results: {args.output / 'results.json'}")
    except (ValueError, FileNotFoundError, FFmpegUnavailableError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    finally:
        if loaded is not None:
            close_session(loaded)
    return 0


if __name__ == "__main__":
    sys.exit(main())
