"""Peak extra memory and time of one forward+backward of three output-layer losses.

Variants, each run in its own fresh subprocess (fp32, CPU):
  (a) full: ``hidden @ weight.T`` then ``F.cross_entropy`` (FullLogitsCrossEntropy);
  (b) torchtune: ``CEWithChunkedOutputLoss`` on 8 chunks ``hidden.chunk(8) @ weight.T``;
  (c) omnilong: ``ChunkedLinearCrossEntropy`` (automatic chunk size).

Memory: the child creates its tensors in place (``torch.empty(...).normal_()``), writes
"5" to ``/proc/self/clear_refs`` (resets the resident-set high-water mark VmHWM to the
current RSS), reads VmRSS as the baseline, runs forward+backward, and reports
``VmHWM - baseline``: the peak resident memory added by the loss, including the
weight gradient.

Usage: .venv/bin/python tools/bench_loss.py [--tokens 4096 --hidden 1024 --vocab 152064]
"""

import argparse
import json
import subprocess
import sys
import time

VARIANTS = {"full": "(a) full logits + F.cross_entropy",
            "torchtune": "(b) torchtune CEWithChunkedOutputLoss, 8 chunks",
            "omnilong": "(c) omnilong ChunkedLinearCrossEntropy"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _child(variant: str, tokens: int, hidden_dim: int, vocab: int) -> dict:
    """Runs one variant in this process; returns its peak extra memory and time."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    hidden = torch.empty(1, tokens, hidden_dim).normal_().requires_grad_()
    weight = torch.empty(vocab, hidden_dim).normal_(std=hidden_dim ** -0.5).requires_grad_()
    labels = torch.empty(1, tokens, dtype=torch.long).random_(vocab)
    if variant == "full":
        def step() -> torch.Tensor:
            logits = (hidden @ weight.t()).float()  # shape: [1, T, V]
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    elif variant == "torchtune":
        from torchtune.modules.loss import CEWithChunkedOutputLoss
        loss_fn = CEWithChunkedOutputLoss(num_output_chunks=8)

        def step() -> torch.Tensor:
            return loss_fn([h @ weight.t() for h in hidden.chunk(8, dim=1)], labels)
    else:
        from omnilong.loss import ChunkedLinearCrossEntropy
        loss_fn = ChunkedLinearCrossEntropy()

        def step() -> torch.Tensor:
            return loss_fn(hidden, weight, labels)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    step().backward()
    seconds = time.perf_counter() - start
    return {"peak_gb": (_status_kib("VmHWM") - baseline) * 1024 / 1e9, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.tokens, args.hidden, args.vocab)))
        return
    sizes = ["--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
    results = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--child", variant, *sizes],
                             check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    ref = results["full"]
    print(f"T={args.tokens} H={args.hidden} V={args.vocab} fp32 CPU, forward+backward")
    print(f"{'variant':<50} {'peak extra GB':>13} {'x (a)':>6} {'time s':>7} {'x (a)':>6}")
    for variant, title in VARIANTS.items():
        r = results[variant]
        print(f"{title:<50} {r['peak_gb']:>13.2f} {r['peak_gb'] / ref['peak_gb']:>6.2f} "
              f"{r['seconds']:>7.1f} {r['seconds'] / ref['seconds']:>6.2f}")


if __name__ == "__main__":
    main()
