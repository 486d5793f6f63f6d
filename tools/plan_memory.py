"""Per-GPU peak memory of an OmniLong training step, and the longest sequence that fits
(the model of :mod:`omnilong.memory_plan`).

    .venv/bin/python tools/plan_memory.py --model qwen2.5-vl-7b --seq-len 131072 --gpus 8
    .venv/bin/python tools/plan_memory.py --model /path/to/checkpoint --seq-len 65536 --gpus 8 --cp 2 \\
        --offload fsdp activations --mlp-chunk-size 8192 --memory-gib 80
    .venv/bin/python tools/plan_memory.py --model qwen2.5-vl-7b --gpus 8 --table   # the table in docs/parallelism-and-memory.md
    .venv/bin/python tools/plan_memory.py --validate-cpu   # predicted vs measured host peaks

``--validate-cpu`` trains small real models on the CPU (fp32, no FSDP: one process), each
in a fresh subprocess, and compares the planner's peak with the measured resident-set peak
of the second step above the process's baseline before the model was built.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from omnilong.memory_plan import RESERVE_GIB, GiB, ModelShape, RunSetup, longest_seq_len, plan
from omnilong.models.named import NAMED_MODELS

# Small models for --validate-cpu: (text args, seq_len, mlp_chunk_size).
CPU_CASES = [
    (
        dict(
            vocab_size=8192, dim=512, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=2048, mrope_section=[16, 24, 24]
        ),
        4096,
        None,
    ),
    (
        dict(
            vocab_size=8192, dim=512, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=2048, mrope_section=[16, 24, 24]
        ),
        4096,
        512,
    ),
    (
        dict(
            vocab_size=32768, dim=256, n_layers=8, n_heads=4, n_kv_heads=2, hidden_dim=1024, mrope_section=[8, 12, 12]
        ),
        4096,
        None,
    ),
]


def model_shape(model: str, freeze_vision: bool = True) -> ModelShape:
    """The shape of a named model or of the checkpoint directory ``model`` (built on meta)."""
    from omnilong.hf_io import read_hf_config
    from omnilong.models.hf_loading import build_model_from_hf_config
    from omnilong.models.named import named_model_config

    with torch.device("meta"):
        if model.lower() in NAMED_MODELS:
            built = build_model_from_hf_config(named_model_config(model))
        elif Path(model).is_dir():
            built = build_model_from_hf_config(read_hf_config(model))
        else:
            raise SystemExit(
                f"--model {model!r}: neither a checkpoint directory nor a known name ({', '.join(NAMED_MODELS)})"
            )
    return ModelShape.of(built, freeze_vision)


def _train(text_args: dict, seq_len: int, mlp_chunk_size, steps: int, before_last_step=lambda: None):
    """``steps`` training steps of a small model on CPU (fp32, activation checkpointing,
    chunked loss, fused AdamW); returns the model."""
    from omnilong.loss import ChunkedLinearCrossEntropy
    from omnilong.models.qwen2_5_vl import Qwen2_5_VLTextArgs, qwen2_5_vl
    from omnilong.models.sequence_chunks import set_mlp_chunk_size
    from omnilong.parallel.fsdp import apply_activation_checkpointing

    torch.manual_seed(0)
    tokens = torch.randint(0, text_args["vocab_size"], (1, seq_len))
    model = qwen2_5_vl(Qwen2_5_VLTextArgs(**text_args))
    set_mlp_chunk_size(model, mlp_chunk_size)
    apply_activation_checkpointing(model)
    loss_fn = ChunkedLinearCrossEntropy(reduction="sum")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    for step in range(steps):
        if step == steps - 1:
            before_last_step()
        loss, _ = loss_fn(model(tokens, return_hidden=True), model.output.weight, torch.roll(tokens, -1, 1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def measure_cpu(text_args: dict, seq_len: int, mlp_chunk_size) -> dict:
    """Host peak (bytes above the baseline) of the second training step of a small model,
    and the planner's prediction. Runs in this process: call it in a fresh one.

    The baseline is taken after the same steps on a tiny model, so that the library code
    and thread pools a first step loads into the resident set are not counted as tensors."""
    from omnilong.metrics import host_peak_memory, reset_host_peak_memory

    tiny = {
        **text_args,
        "dim": 64,
        "n_heads": 2,
        "n_kv_heads": 1,
        "hidden_dim": 128,
        "n_layers": 1,
        "mrope_section": [4, 6, 6],
    }
    _train(tiny, 2 * (mlp_chunk_size or 32), mlp_chunk_size, steps=2)
    gc.collect()
    baseline = reset_host_peak_memory()
    model = _train(text_args, seq_len, mlp_chunk_size, steps=2, before_last_step=reset_host_peak_memory)
    measured = host_peak_memory() - baseline
    shape = ModelShape.of(model, freeze_vision=False)
    predicted = plan(shape, RunSetup(seq_len=seq_len, compute_bytes=4, fsdp=False, mlp_chunk_size=mlp_chunk_size))
    return {"measured": measured, "predicted": predicted["peak"], "components": predicted}


def measure_cpu_in_subprocess(text_args: dict, seq_len: int, mlp_chunk_size) -> dict:
    """:func:`measure_cpu` in a fresh process (its own peak), with large tensors allocated by
    ``mmap`` so that freed ones leave the resident set (glibc's threshold otherwise adapts up to 32 MB)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    child = [sys.executable, __file__, "--child", json.dumps([text_args, seq_len, mlp_chunk_size])]
    run = subprocess.run(child, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    if run.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _print_plan(shape: ModelShape, run: RunSetup, memory: float) -> None:
    result = plan(shape, run)
    print(
        f"seq_len {run.seq_len}, {run.gpus} GPUs, cp {run.cp}, dp_replicate {run.dp_replicate}, "
        f"batch {run.batch_size}: per-GPU bytes (GiB)"
    )
    for name, value in result.items():
        print(f"  {name:<18} {value / GiB:8.2f}")
    longest = longest_seq_len(shape, run, int(memory * GiB))
    print(f"longest seq_len that fits in {memory:.1f} GiB: {longest}")


def _switch_table(shape: ModelShape, gpus: int, memory: float) -> None:
    """Longest trainable context per switch, one 8-GPU node, markdown."""
    rows = [
        ("plain (bf16, activation checkpointing)", {}),
        ("+ mlp_chunk_size 4096", dict(mlp_chunk_size=4096)),
        ("+ fsdp_cpu_offload", dict(fsdp_cpu_offload=True)),
        ("+ activation_offload", dict(activation_offload=True)),
        ("+ mlp_chunk_size + fsdp_cpu_offload", dict(mlp_chunk_size=4096, fsdp_cpu_offload=True)),
        ("+ all three", dict(mlp_chunk_size=4096, fsdp_cpu_offload=True, activation_offload=True)),
    ]
    cps = [c for c in (1, 2, 4, 8) if gpus % c == 0]
    print("| switches | " + " | ".join(f"cp {c}" for c in cps) + " |")
    print("|---|" + "---:|" * len(cps))
    for name, switches in rows:
        cells = [
            longest_seq_len(shape, RunSetup(seq_len=1, gpus=gpus, cp=c, **switches), int(memory * GiB)) for c in cps
        ]
        print(f"| {name} | " + " | ".join(f"{n // 1024}K" for n in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-vl-7b", help="checkpoint directory or " + ", ".join(NAMED_MODELS))
    parser.add_argument("--config", help="a recipe config (path or shipped name): its sequence length and switches")
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--dp-replicate", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument(
        "--offload",
        nargs="*",
        default=[],
        choices=["fsdp", "activations"],
        help="fsdp: fsdp_cpu_offload; activations: activation_offload",
    )
    parser.add_argument("--mlp-chunk-size", type=int)
    parser.add_argument("--no-activation-checkpointing", action="store_true")
    parser.add_argument("--train-vision", action="store_true", help="freeze_vision: false")
    parser.add_argument("--memory-gib", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument("--reserve-gib", type=float, default=RESERVE_GIB, help="kept free of tensors")
    parser.add_argument("--table", action="store_true", help="longest context per switch and cp degree")
    parser.add_argument("--validate-cpu", action="store_true", help="predicted vs measured host peaks")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_cpu(*json.loads(args.child))))
        return
    if args.validate_cpu:
        print(
            "CPU, fp32, one process without FSDP, activation checkpointing, chunked loss, fused AdamW; "
            "second step's resident-set peak above the baseline"
        )
        print(
            f"{'layers':>6} {'dim':>5} {'mlp':>5} {'vocab':>6} {'tokens':>6} {'mlp chunk':>9} "
            f"{'predicted MiB':>13} {'measured MiB':>12} {'error':>6}"
        )
        for text_args, seq_len, chunk in CPU_CASES:
            r = measure_cpu_in_subprocess(text_args, seq_len, chunk)
            print(
                f"{text_args['n_layers']:>6} {text_args['dim']:>5} {text_args['hidden_dim']:>5} "
                f"{text_args['vocab_size']:>6} {seq_len:>6} {chunk or '-':>9} {r['predicted'] / 2**20:>13.0f} "
                f"{r['measured'] / 2**20:>12.0f} {r['predicted'] / r['measured'] - 1:>+6.1%}"
            )
        return
    shape = model_shape(args.model, freeze_vision=not args.train_vision)
    memory = args.memory_gib - args.reserve_gib
    if args.table:
        _switch_table(shape, args.gpus, memory)
        return
    if args.config:
        from omnilong.config import validate_config
        from omnilong.config_files import load_config, resolve_config

        run = RunSetup.from_config(validate_config(load_config(resolve_config(args.config), [])), args.gpus)
        _print_plan(shape, run, memory)
        print(
            f"predicted; the dry run of the real code is the answer: omnilong run --nproc_per_node {args.gpus} "
            f"--config {args.config} --dry-run"
        )
        return
    run = RunSetup(
        seq_len=args.seq_len,
        gpus=args.gpus,
        cp=args.cp,
        dp_replicate=args.dp_replicate,
        batch_size=args.batch_size,
        compute_bytes=2 if args.dtype == "bf16" else 4,
        fsdp_cpu_offload="fsdp" in args.offload,
        activation_offload="activations" in args.offload,
        activation_checkpointing=not args.no_activation_checkpointing,
        mlp_chunk_size=args.mlp_chunk_size,
    )
    try:
        _print_plan(shape, run, memory)
    except ValueError as e:
        raise SystemExit(f"plan_memory: {e}") from None


if __name__ == "__main__":
    main()
