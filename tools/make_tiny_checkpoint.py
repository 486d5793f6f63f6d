"""Write a tiny random Hugging Face checkpoint and tokenizer (no download): Qwen2.5-VL by
default, or LLaVA-OneVision (with its processor).

    python tools/make_tiny_checkpoint.py --output outputs/tiny-qwen2_5_vl [--flat-config]
    python tools/make_tiny_checkpoint.py --model llava_onevision --output outputs/tiny-llava_ov
"""

import argparse

from omnilong.testing.tiny_llava_onevision import write_tiny_llava_onevision
from omnilong.testing.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--model", choices=("qwen2_5_vl", "llava_onevision"), default="qwen2_5_vl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--flat-config",
        action="store_true",
        help="Qwen2.5-VL: write config.json in the published flat layout instead of the nested one",
    )
    args = parser.parse_args()
    if args.model == "llava_onevision":
        if args.flat_config:
            parser.error("--flat-config is for Qwen2.5-VL only")
        path = write_tiny_llava_onevision(args.output, seed=args.seed)
    else:
        path = write_tiny_qwen2_5_vl(args.output, seed=args.seed, nested_config=not args.flat_config)
    print(f"tiny {args.model} checkpoint written to {path}")


if __name__ == "__main__":
    main()
