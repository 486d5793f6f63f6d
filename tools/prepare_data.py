"""Tokenize a corpus once into a prepared directory that training memory-maps.

    python tools/prepare_data.py --kind text --tokenizer checkpoints/Qwen2.5-VL-7B-Instruct \
        --output data/prepared/stage1 --separator-token '<|endoftext|>' --workers 8 'data/stage1/*.jsonl'
    python tools/prepare_data.py --kind chat --tokenizer ... --output data/prepared/stage2 data/stage2/
    python tools/prepare_data.py --kind video_sft --tokenizer ... --output data/prepared/stage3 \
        --data-root data/stage3/videos --skip-bad-samples data/stage3/*.jsonl

Then point the config's dataset at it (omnilong.data.prepared_text_dataset /
prepared_chat_dataset / prepared_video_sft_dataset, ``sources: [data/prepared/stage1]``).
For LLaVA-OneVision, add ``--video-format llava_onevision`` to the video_sft step and read it
with omnilong.data.prepared_llava_video_sft_dataset.
Running it again with the same sources, tokenizer and settings does nothing (--force redoes it).
--output must be absent, empty or a prepared directory (it is replaced whole) and hold no source.

    python tools/prepare_data.py --verify data/prepared/stage1

checks every file of a prepared directory against the sha256 recorded when it was prepared.
"""

import argparse
import sys

from omnilong.data.prepare import VIDEO_FORMATS, prepare
from omnilong.data.prepared import KINDS, verify_prepared
from omnilong.data.video import FFmpegUnavailableError
from omnilong.distributed import available_cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_files", nargs="*", help="files, directories or glob patterns")
    parser.add_argument("--kind", choices=KINDS, help="required to prepare")
    parser.add_argument("--tokenizer", help="required to prepare: model or tokenizer directory that training uses")
    parser.add_argument("--output", help="required to prepare: prepared directory to write")
    parser.add_argument("--workers", type=int, default=min(8, available_cores()), help="tokenizer processes")
    parser.add_argument("--text-column", default="text", help="text: field of JSONL / JSON / parquet records")
    parser.add_argument("--separator-token", default=None, help="text: token after each document (default EOS)")
    parser.add_argument("--data-root", default=None, help="video_sft: directory of relative video paths")
    parser.add_argument(
        "--skip-bad-samples",
        action="store_true",
        help="skip and count bad samples (malformed lines; chat / video_sft: bad samples, unreadable videos)",
    )
    parser.add_argument(
        "--video-format",
        default="qwen2_5_vl",
        choices=sorted(VIDEO_FORMATS),
        help="video_sft: the model family whose video placeholders the text gets",
    )
    parser.add_argument("--force", action="store_true", help="prepare again even if up to date")
    parser.add_argument("--verify", metavar="DIR", help="check a prepared directory's files against their checksums")
    args = parser.parse_args()
    if args.verify:
        try:
            meta = verify_prepared(args.verify)
        except (ValueError, OSError) as e:
            sys.exit(f"prepare_data: {e}")
        print(f"{args.verify}: every file matches its checksum ({meta['num_tokens']:,} tokens)")
        return
    missing = [f"--{k}" for k in ("kind", "tokenizer", "output") if getattr(args, k) is None]
    if missing or not args.data_files:
        parser.error(
            f"to prepare, give {', '.join(missing + ['data files'] * (not args.data_files))} (or --verify DIR)"
        )
    try:
        meta = prepare(
            args.kind,
            args.data_files,
            args.tokenizer,
            args.output,
            workers=args.workers,
            text_column=args.text_column,
            separator_token=args.separator_token,
            data_root=args.data_root,
            skip_bad_samples=args.skip_bad_samples,
            force=args.force,
            video_format=args.video_format,
        )
    except (ValueError, OSError, FFmpegUnavailableError) as e:  # bad input, a full disk, no FFmpeg: one line
        sys.exit(f"prepare_data: {e}")
    if meta["up_to_date"]:
        print(f"{args.output} is up to date ({meta['num_tokens']:,} tokens); --force prepares it again")
        return
    seconds = meta["prepare_seconds"]
    print(
        f"{args.output}: {meta['num_documents']:,} documents, {meta['num_tokens']:,} tokens in {seconds:.1f} s "
        f"({meta['num_tokens'] / max(seconds, 1e-9):,.0f} tokens/s, {args.workers} workers); skipped: "
        f"{meta['num_skipped']['empty_documents']} empty documents, {meta['num_skipped']['bad_samples']} bad samples"
    )


if __name__ == "__main__":
    main()
