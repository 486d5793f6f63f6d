"""Padding and throughput of instruction tuning with and without packing, side by side.

For each tiny instruction-tuning config (stage 2 chat, stage 3 video) and ``dataset.packed``
false / true, one fresh process runs the recipe for ``--steps`` steps (``tune run``'s
setup and train, in-process) and reports:

* padding: the fraction of the tokens fed to the model that are padding, over the rows of
  those steps (the sampler's order, collated as the recipe collates them);
* fill: the real tokens of those rows over ``rows x max_seq_len`` (how full the rows are);
* samples per step;
* tokens/s: real (non-padding) input tokens of those steps per second of ``train()``, and
  trained tokens (labels not ignored) per second.

Usage (needs ``outputs/tiny-qwen2_5_vl`` and ``outputs/tiny-videos``, see the demo in docs/training.md):
    python tools/bench_packing.py [--steps 20]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"stage2 chat": "configs/tiny/stage2_text_sft.yaml", "stage3 video": "configs/tiny/stage3_video_sft.yaml"}


def _fed_rows(recipe, steps: int) -> tuple[int, int, int]:
    """``(tokens fed, padding tokens, samples)`` of the batches the first ``steps`` steps take
    (one rank: the sampler's order, batches of ``batch_size`` padded to their longest row)."""
    from omnilong.data.sampler import ResumableDistributedSampler

    cfg, dataset = recipe.cfg, recipe.dataset
    sampler = ResumableDistributedSampler(len(dataset), 1, 0, shuffle=cfg.shuffle, seed=cfg.seed)
    wanted, order, epoch = steps * cfg.gradient_accumulation_steps * cfg.batch_size, [], 0
    while len(order) < wanted:
        sampler.set_epoch(epoch)
        order += list(sampler)
        epoch += 1
    rows = getattr(dataset, "rows", None)
    fed = padding = samples = 0
    for start in range(0, wanted, cfg.batch_size):
        batch = order[start : start + cfg.batch_size]  # one micro-batch
        lengths = [len(dataset[i]["input_ids"]) for i in batch]
        fed += len(batch) * max(lengths)
        padding += len(batch) * max(lengths) - sum(lengths)
        samples += sum(len(rows[i]) for i in batch) if rows is not None else len(batch)
    return fed, padding, samples


def run_one(config: str, packed: bool, steps: int, output_dir: str) -> dict:
    """One configuration in this process: setup, the padding of its batches, timed ``train()``."""
    from omegaconf import OmegaConf

    sys.path.insert(0, str(REPO / "recipes"))
    from omnilong_full import OmniLongFullRecipe

    os.chdir(REPO)
    cfg = OmegaConf.merge(
        OmegaConf.load(config),
        OmegaConf.from_dotlist(
            [
                f"output_dir={output_dir}",
                f"max_steps={steps}",
                f"dataset.packed={str(packed).lower()}",
                "lr_scheduler.num_warmup_steps=1",
            ]
        ),
    )
    recipe = OmniLongFullRecipe(cfg)
    recipe.setup()
    cfg = recipe.cfg
    try:
        fed, padding, samples = _fed_rows(recipe, steps)
        start = time.perf_counter()
        recipe.train()
        seconds = time.perf_counter() - start
    finally:
        recipe.cleanup()
    metrics = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    trained = sum(m["num_tokens"] for m in metrics)
    rows = steps * cfg.gradient_accumulation_steps * cfg.batch_size
    return {
        "rows": len(recipe.dataset),
        "padding": padding / fed,
        "fill": (fed - padding) / (rows * cfg.max_seq_len),
        "samples_per_step": samples / steps,
        "real_tokens_per_s": (fed - padding) / seconds,
        "trained_tokens_per_s": trained / seconds,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--one", nargs=3, metavar=("CONFIG", "PACKED", "OUTPUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        config, packed, output_dir = args.one
        print(json.dumps(run_one(config, packed == "true", args.steps, output_dir)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"tiny configs, CPU, {args.steps} steps each, one process; tokens/s over train() (setup excluded)")
    print(
        f"{'config':14} {'packed':6} {'rows':>5} {'samples/step':>12} {'padding':>8} "
        f"{'fill':>6} {'real tok/s':>10} {'trained tok/s':>13} {'x unpacked':>10}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in CONFIGS.items():
            base = None
            for packed in ("false", "true"):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--steps",
                        str(args.steps),
                        "--one",
                        config,
                        packed,
                        f"{tmp}/{name.replace(' ', '_')}_{packed}",
                    ],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=False,
                )
                if out.returncode != 0:
                    print(f"{name} packed={packed} failed:\n{out.stderr[-2000:]}")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                base = base or r["real_tokens_per_s"]
                print(
                    f"{name:14} {packed:6} {r['rows']:5d} {r['samples_per_step']:12.2f} {r['padding']:8.1%} "
                    f"{r['fill']:6.1%} "
                    f"{r['real_tokens_per_s']:10.0f} {r['trained_tokens_per_s']:13.0f} "
                    f"{r['real_tokens_per_s'] / base:10.2f}"
                )


if __name__ == "__main__":
    main()
