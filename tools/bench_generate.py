"""Greedy decoding with the key/value cache against recomputing the whole sequence per token.

Both decode the same tokens from the same prompt (checked); the uncached loop runs the
model's plain forward over prompt + answer so far for every new token, as a generation
without a cache must. Times are the wall clock of the whole answer, prefill included,
measured side by side in one process (after a warm-up; the fastest of 3 runs; one CPU thread)
on a tiny random Qwen2.5-VL (fp32).

Usage:
    python tools/bench_generate.py [--lengths 512 2048 --new-tokens 32] [--device cuda]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from omnilong.generation.generate import greedy_generate
from omnilong.models.hf_loading import load_hf_model
from omnilong.testing.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl


@torch.no_grad()
def uncached_greedy(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy tokens by a full forward over the sequence so far, per token."""
    tokens: list[int] = []
    for _ in range(new_tokens):
        ids = torch.cat([input_ids, torch.tensor([tokens], dtype=torch.long, device=input_ids.device)], 1)
        tokens.append(int(model(ids)[0, -1].argmax()))
    return tokens


def _timed(fn, repeats: int = 3):
    """``fn()`` and its fastest wall time over ``repeats`` runs (the machine may be shared)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return result, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = write_tiny_qwen2_5_vl(Path(tempfile.mkdtemp()), seed=0)
    model = load_hf_model(model_dir, device=args.device).eval()
    greedy_generate(model, {"input_ids": torch.arange(10, 26, device=args.device)[None]}, 2, [])  # warm-up
    uncached_greedy(model, torch.arange(10, 26, device=args.device)[None], 2)
    print(f"{'prompt':>7} {'new':>4} {'cached s':>9} {'uncached s':>11} {'ratio':>6}")
    for length in args.lengths:
        input_ids = torch.randint(10, 1000, (1, length), generator=torch.Generator().manual_seed(length))
        input_ids = input_ids.to(args.device)
        cached, t_cached = _timed(lambda ids=input_ids: greedy_generate(model, {"input_ids": ids}, args.new_tokens, []))
        uncached, t_uncached = _timed(lambda ids=input_ids: uncached_greedy(model, ids, args.new_tokens))
        if cached.tokens != uncached:
            raise SystemExit(f"cached and uncached decoding differ at prompt length {length}")
        print(f"{length:>7} {args.new_tokens:>4} {t_cached:>9.3f} {t_uncached:>11.3f} {t_uncached / t_cached:>6.1f}")


if __name__ == "__main__":
    main()
