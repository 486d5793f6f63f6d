"""Peak extra memory and time of one forward+backward of output-layer losses.

Variants, each run in its own fresh subprocess (fp32 on CPU, bf16 hidden and weight on
CUDA; the weight and the hidden states both require gradients):
  (a) full: ``hidden @ weight.T`` then ``F.cross_entropy`` (FullLogitsCrossEntropy);
  (b) torchtune: ``CEWithChunkedOutputLoss`` on 8 chunks ``hidden.chunk(8) @ weight.T``;
  (c) omnilong: ``ChunkedLinearCrossEntropy`` (automatic chunk size; labels on the host, as
      the recipe passes them);
  (d) liger: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (CUDA, when
      ``liger-kernel`` is importable: an optional package, not a dependency).

Memory on CPU: the child creates its tensors in place (``torch.empty(...).normal_()``),
writes "5" to ``/proc/self/clear_refs`` (resets the resident-set high-water mark VmHWM to
the current RSS), reads VmRSS as the baseline, runs forward+backward, and reports
``VmHWM - baseline``. On CUDA: ``max_memory_allocated()`` minus the memory allocated
before the step. Either way: the peak memory the loss adds, its gradients included.
Time on CUDA: the mean of 3 steps after one warm-up step (which also compiles).

Usage:
    python tools/bench_loss.py [--tokens 4096 --hidden 1024 --vocab 152064]
    python tools/bench_loss.py --device cuda [--tokens 16384 65536 --hidden 3584]
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import time

VARIANTS = {
    "full": "(a) full logits + F.cross_entropy",
    "torchtune": "(b) torchtune CEWithChunkedOutputLoss, 8 chunks",
    "omnilong": "(c) omnilong ChunkedLinearCrossEntropy",
    "liger": "(d) Liger FusedLinearCrossEntropy",
}


def _child(variant: str, tokens: int, hidden_dim: int, vocab: int, device: str) -> dict:
    """Runs one variant in this process; returns its peak extra memory and time."""
    import torch
    import torch.nn.functional as F

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    hidden = torch.empty(1, tokens, hidden_dim, device=device, dtype=dtype).normal_().requires_grad_()
    weight = torch.empty(vocab, hidden_dim, device=device, dtype=dtype).normal_(std=hidden_dim**-0.5)
    weight.requires_grad_()
    labels = torch.empty(1, tokens, dtype=torch.long, device=device).random_(vocab)
    if variant == "full":

        def step() -> torch.Tensor:
            logits = (hidden @ weight.t()).float()  # shape: [1, T, V]
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    elif variant == "torchtune":
        from torchtune.modules.loss import CEWithChunkedOutputLoss

        loss_fn = CEWithChunkedOutputLoss(num_output_chunks=8)

        def step() -> torch.Tensor:
            return loss_fn([h @ weight.t() for h in hidden.chunk(8, dim=1)], labels)
    elif variant == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss()

        def step() -> torch.Tensor:
            return loss_fn(weight, hidden.flatten(0, 1), labels.flatten())
    else:
        from omnilong.loss import ChunkedLinearCrossEntropy

        loss_fn = ChunkedLinearCrossEntropy()
        host_labels = labels.cpu()

        def step() -> torch.Tensor:
            return loss_fn(hidden, weight, host_labels)

    if cuda:
        return _time_cuda(step, hidden, weight)
    from omnilong.metrics import host_peak_memory, reset_host_peak_memory

    baseline = reset_host_peak_memory()
    start = time.perf_counter()
    step().backward()
    seconds = time.perf_counter() - start
    return {"peak_gb": (host_peak_memory() - baseline) / 1e9, "seconds": seconds}


def _time_cuda(step, hidden, weight, repeats: int = 3) -> dict:
    import torch

    def run():
        hidden.grad = weight.grad = None
        step().backward()

    try:
        run()  # warm-up (and compilation)
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return {"oom": True}
    seconds = (time.perf_counter() - start) / repeats
    return {"peak_gb": (torch.cuda.max_memory_allocated() - before) / 2**30, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, nargs="+", help="default: 4096 on CPU; 16384 65536 on CUDA")
    parser.add_argument("--hidden", type=int, help="default: 1024 on CPU, 3584 on CUDA")
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    hidden = args.hidden or (3584 if cuda else 1024)
    all_tokens = args.tokens or ([16384, 65536] if cuda else [4096])
    if args.child:
        print(json.dumps(_child(args.child, all_tokens[0], hidden, args.vocab, args.device)))
        return
    variants = [v for v in VARIANTS if v != "liger" or (cuda and importlib.util.find_spec("liger_kernel"))]
    unit = "GiB" if cuda else "GB"
    for tokens in all_tokens:
        sizes = ["--device", args.device, "--tokens", str(tokens), "--hidden", str(hidden), "--vocab", str(args.vocab)]
        results = {}
        for variant in variants:
            run = subprocess.run([sys.executable, __file__, "--child", variant, *sizes], capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{run.stderr[-3000:]}")
            results[variant] = json.loads(run.stdout.strip().splitlines()[-1])
        ref = results["liger"] if "liger" in results else results["full"]
        ref_name = "(d)" if "liger" in results else "(a)"
        print(f"T={tokens} H={hidden} V={args.vocab} {'bf16 CUDA' if cuda else 'fp32 CPU'}, forward+backward")
        print(f"{'variant':<50} {'peak extra ' + unit:>14} {'x ' + ref_name:>6} {'time s':>8} {'x ' + ref_name:>6}")
        for variant in variants:
            r = results[variant]
            if r.get("oom") or ref.get("oom"):
                print(f"{VARIANTS[variant]:<50} {'out of memory' if r.get('oom') else ''}")
                continue
            print(
                f"{VARIANTS[variant]:<50} {r['peak_gb']:>14.2f} {r['peak_gb'] / ref['peak_gb']:>6.2f} "
                f"{r['seconds']:>8.3f} {r['seconds'] / ref['seconds']:>6.2f}"
            )


if __name__ == "__main__":
    main()
