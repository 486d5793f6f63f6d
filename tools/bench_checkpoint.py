"""Step time of a tiny run with a checkpoint every ``--save-every`` steps against none (checkpoints are written
in the background: the difference is what a save costs the training loop).

    python tools/bench_checkpoint.py [--config tiny/stage1_text] [--steps 20] [--save-every 5] [key=value ...]

Runs ``omnilong run`` twice, side by side in one invocation, and prints seconds per step from
each run's "done: N steps in X s" line.
"""

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def seconds_per_step(config: str, steps: int, save_every: str, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(Path(sys.executable).parent / "omnilong"), "run", "--config", config, f"output_dir={out}/run"]
        cmd += [f"max_steps={steps}", f"save_every_n_steps={save_every}", "keep_last_n_checkpoints=2", *overrides]
        result = subprocess.run(cmd, capture_output=True, text=True)
        done = re.search(r"done: (\d+) steps in ([\d.]+) s", result.stderr)
        if result.returncode != 0 or done is None:
            sys.exit(f"run failed: {' '.join(cmd)}\n{result.stderr[-2000:]}")
        return float(done.group(2)) / int(done.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny/stage1_text")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    without = seconds_per_step(args.config, args.steps, "null", args.overrides)
    with_save = seconds_per_step(args.config, args.steps, str(args.save_every), args.overrides)
    print(
        f"{args.config}, {args.steps} steps: {without:.3f} s/step without saves, {with_save:.3f} s/step saving every {args.save_every} steps"
    )


if __name__ == "__main__":
    main()
