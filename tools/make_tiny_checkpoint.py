"""Write a tiny random Qwen2.5-VL Hugging Face checkpoint and tokenizer (no download).

    python tools/make_tiny_checkpoint.py --output outputs/tiny-qwen2_5_vl [--flat-config]
"""

import argparse

from omnilong.models.qwen2_5_vl.tiny_checkpoint import write_tiny_qwen2_5_vl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flat-config", action="store_true",
                        help="write config.json in the published flat layout instead of the nested one")
    args = parser.parse_args()
    path = write_tiny_qwen2_5_vl(args.output, seed=args.seed, nested_config=not args.flat_config)
    print(f"tiny Qwen2.5-VL checkpoint written to {path}")


if __name__ == "__main__":
    main()
