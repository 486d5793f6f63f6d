"""One full training step (forward, backward, optimizer) of an N-layer Qwen2.5-VL slice:
OmniLong against transformers' ``Qwen2_5_VLForConditionalGeneration``, side by side.

Each (implementation, sequence length) runs in a fresh subprocess, so that peak memory
and an out-of-memory failure belong to that run alone. Both sides: the same shape, one
packed-free row of ``T`` tokens, activation checkpointing per layer, AdamW (fused on
CUDA), bf16 weights on CUDA (fp32 on CPU).

* OmniLong: the native model (``qwen2_5_vl``), ``ChunkedLinearCrossEntropy`` on the final
  hidden states.
* transformers: ``attn_implementation="sdpa"``, ``gradient_checkpointing_enable()``, its own
  loss from ``labels`` (full logits).

Reported per run: seconds per step (mean of the timed steps after one warm-up step),
tokens/s, model TFLOP/s (``6 * params * T`` for the dense part, ``3 * 2 * T^2 * d`` per
layer for causal attention; recompute not counted) and the utilisation of the card's
dense bf16 peak where it is known, peak memory (CUDA: ``max_memory_allocated``; CPU: the
resident-set high-water mark above the baseline), or "out of memory".

Usage:
    python tools/bench_step.py                       # CPU default: 2 layers, hidden 512, 8K
    python tools/bench_step.py --device cuda                   # 4-layer 7B slice at 32K, 64K, 128K
"""

import argparse
import json
import subprocess
import sys
import time

# Dense bf16 peak (TFLOP/s, without sparsity) by device name.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}

SHAPES = {
    # name: (hidden, heads, kv heads, intermediate, vocab, mrope_section)
    "7b": (3584, 28, 4, 18944, 152064, [16, 24, 24]),
    "cpu": (512, 8, 2, 1376, 32768, [8, 12, 12]),
}


def _hf_config(shape: tuple, layers: int):
    from transformers import Qwen2_5_VLConfig

    hidden, heads, kv_heads, intermediate, vocab, section = shape
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=1 << 20,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
        ),
        vision_config=dict(
            depth=1,
            hidden_size=64,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden,
            fullatt_block_indexes=[0],
        ),
    )


def _model_flops(shape: tuple, layers: int, tokens: int) -> float:
    """Model FLOPs of one training step (forward + backward) of one row of ``tokens``."""
    hidden, heads, kv_heads, intermediate, vocab, _ = shape
    head_dim = hidden // heads
    per_layer = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * intermediate
    dense = 6 * tokens * (layers * per_layer + vocab * hidden)
    attention = 3 * layers * 2 * tokens * tokens * heads * head_dim  # causal: half of 4 * T^2 * d
    return float(dense + attention)


def _child(impl: str, shape_name: str, layers: int, tokens: int, device: str, steps: int) -> dict:
    import torch

    from omnilong.metrics import host_peak_memory, reset_host_peak_memory

    shape = SHAPES[shape_name]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    input_ids = torch.randint(0, shape[4], (1, tokens), device=device)
    labels = torch.roll(input_ids, -1, dims=1)
    if impl == "omnilong":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        from omnilong.loss import ChunkedLinearCrossEntropy
        from omnilong.models import build_model_from_hf_config

        with torch.device(device):
            model = build_model_from_hf_config(_hf_config(shape, layers).to_dict()).to(dtype)
        model.visual = None
        for i, layer in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)
        loss_fn = ChunkedLinearCrossEntropy()

        def loss_of_step():
            return loss_fn(model(input_ids, return_hidden=True), model.output.weight, labels)
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration

        config = _hf_config(shape, layers)
        config._attn_implementation = "sdpa"
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
        model.model.visual.requires_grad_(False)
        model.gradient_checkpointing_enable()
        hf_labels = torch.cat([input_ids[:, :1], labels[:, :-1]], dim=1)  # transformers shifts itself

        def loss_of_step():
            return model(input_ids=input_ids, labels=hf_labels).loss

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")

    def step():
        loss_of_step().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    try:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            baseline = reset_host_peak_memory()
        step()  # warm-up: allocations, optimizer state, compilation
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        seconds = (time.perf_counter() - start) / steps
    except torch.OutOfMemoryError:
        return {"oom": True}
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else host_peak_memory() - baseline
    return {"oom": False, "seconds": seconds, "peak_gib": peak / 2**30}


def _peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, help="decoder layers (default: 2 on CPU, 4 on CUDA)")
    parser.add_argument("--shape", choices=list(SHAPES), help="dims (default: 'cpu' on CPU, '7b' on CUDA)")
    parser.add_argument("--seq-lens", type=int, nargs="+", help="default: 8192 on CPU; 32768 65536 131072 on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (default 1 CPU, 3 CUDA)")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    layers = args.layers or (4 if cuda else 2)
    shape = args.shape or ("7b" if cuda else "cpu")
    steps = args.steps or (3 if cuda else 1)
    if args.child:
        print(json.dumps(_child(args.child[0], shape, layers, int(args.child[1]), args.device, steps)))
        return
    seq_lens = args.seq_lens or ([32768, 65536, 131072] if cuda else [8192])
    peak = _peak_tflops(args.device)
    import torch

    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    print(
        f"{layers}-layer Qwen2.5-VL slice ({shape} dims), {device_name}, torch {torch.__version__}, "
        f"{'bf16' if cuda else 'fp32'}, activation checkpointing, AdamW; one row per step"
    )
    print(
        f"{'tokens':>7} {'impl':<13} {'s/step':>7} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} "
        f"{'time x hf':>9} {'mem x hf':>8}"
    )
    for tokens in seq_lens:
        results = {}
        for impl in ("transformers", "omnilong"):
            child = [
                sys.executable,
                __file__,
                "--device",
                args.device,
                "--layers",
                str(layers),
                "--shape",
                shape,
                "--steps",
                str(steps),
                "--child",
                impl,
                str(tokens),
            ]
            run = subprocess.run(child, capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"{impl} at {tokens} tokens failed:\n{run.stderr[-3000:]}")
            results[impl] = json.loads(run.stdout.strip().splitlines()[-1])
        hf = results["transformers"]
        for impl, r in results.items():
            if r["oom"]:
                print(f"{tokens:>7} {impl:<13} {'out of memory':>34}")
                continue
            tflops = _model_flops(SHAPES[shape], layers, tokens) / r["seconds"] / 1e12
            mfu = f"{tflops / peak:.1%}" if peak else "-"
            ratio = "-" if hf["oom"] else f"{r['seconds'] / hf['seconds']:.2f}"
            mem = "-" if hf["oom"] else f"{r['peak_gib'] / hf['peak_gib']:.2f}"
            print(
                f"{tokens:>7} {impl:<13} {r['seconds']:>7.3f} {tokens / r['seconds']:>9.0f} {tflops:>8.2f} "
                f"{mfu:>6} {r['peak_gib']:>9.2f} {ratio:>9} {mem:>8}"
            )


if __name__ == "__main__":
    main()
