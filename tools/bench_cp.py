"""Context-parallel benchmarks, measured side by side in one run.

    python tools/bench_cp.py [--parts balance] [--seq-len 131072]

Parts (each a function registered in ``PARTS``):

* ``balance``: causal attention work per cp rank, i.e. the number of attended
  (query, key) pairs, for the zigzag and the contiguous layouts at cp = 2, 4, 8.
  Pure arithmetic on the layouts of ``omnilong.parallel.sequence_sharding``: a query at
  global position ``p`` attends ``p + 1`` keys. The imbalance ``max / mean`` bounds the
  speed-up lost to the slowest rank; zigzag should be <= 1.05.

A part measuring training-step memory at cp=1 vs cp=2 is to be added as another entry
of ``PARTS``.
"""

import argparse
from typing import Callable

import torch

from omnilong.parallel.sequence_sharding import contiguous_positions, zigzag_positions

LAYOUTS: dict[str, Callable[[int, int, int], torch.Tensor]] = {
    "zigzag": zigzag_positions,
    "contiguous": contiguous_positions,
}


def causal_pairs_per_rank(layout: Callable[[int, int, int], torch.Tensor], seq_len: int,
                          cp: int) -> list[int]:
    """Attended (query, key) pairs of each rank: ``sum over held positions p of (p + 1)``."""
    return [int((layout(seq_len, rank, cp) + 1).sum()) for rank in range(cp)]


def attention_balance(args: argparse.Namespace) -> None:
    """Print max / mean causal work per rank for each layout and cp size."""
    print(f"causal attention work per rank (attended query-key pairs), T = {args.seq_len}")
    print(f"{'layout':<11} {'cp':>3} {'max':>16} {'mean':>16} {'max/mean':>9}")
    for cp in (2, 4, 8):
        for name, layout in LAYOUTS.items():
            work = causal_pairs_per_rank(layout, args.seq_len, cp)
            mean = sum(work) / cp
            print(f"{name:<11} {cp:>3} {max(work):>16,} {mean:>16,.0f} {max(work) / mean:>9.3f}")


PARTS: dict[str, Callable[[argparse.Namespace], None]] = {
    "balance": attention_balance,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=sorted(PARTS))
    parser.add_argument("--seq-len", type=int, default=131072,
                        help="sequence length, a multiple of 16 (2 * the largest cp)")
    args = parser.parse_args()
    for part in args.parts:
        PARTS[part](args)


if __name__ == "__main__":
    main()
