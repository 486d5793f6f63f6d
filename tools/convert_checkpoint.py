"""Export a training checkpoint to a Hugging Face model directory (and optionally the Hub).

    python tools/convert_checkpoint.py --checkpoint outputs/run/checkpoints/step_1000 \\
        --base Qwen2.5-VL-7B-Instruct --output outputs/run/hf [--dtype bfloat16] \\
        [--max-shard-size 5GB] [--push-to-hub user/model [--private]]

Run it in OmniLong's environment (``source .venv/bin/activate`` first, as for every command
of the manual). The output has the base's tensor names, files and config.json (with the run's rope_theta
and dtype), loadable by transformers' ``from_pretrained``.
"""

import argparse
import logging
import sys
from pathlib import Path

import torch

from omnilong.checkpoint.hf_export import export_hf_checkpoint, parse_size

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _shard_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def push_to_hub(folder: Path, repo_id: str, private: bool) -> str:
    """Create (if needed) the model repo ``repo_id`` and upload ``folder`` to it.

    Returns:
        The URL of the commit.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    return str(
        api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type="model", commit_message="Upload model exported by OmniLong"
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="a <output_dir>/checkpoints/step_N directory")
    parser.add_argument("--base", required=True, type=Path, help="the HF model directory the run started from")
    parser.add_argument("--output", required=True, type=Path, help="directory to create")
    parser.add_argument(
        "--dtype",
        type=_dtype,
        default=None,
        help="dtype of floating tensors (default: the base's dtype of each tensor)",
    )
    parser.add_argument("--max-shard-size", type=_shard_size, default="5GB", help="e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the output to this Hugging Face model repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    args = parser.parse_args(argv)
    if args.private and not args.push_to_hub:
        parser.error("--private needs --push-to-hub")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")

    try:
        output = export_hf_checkpoint(args.checkpoint, args.base, args.output, args.dtype, args.max_shard_size)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.checkpoint} to {output}")
    if args.push_to_hub:
        print(f"uploaded to {push_to_hub(output, args.push_to_hub, args.private)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
