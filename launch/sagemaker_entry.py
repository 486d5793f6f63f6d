"""The entry point of a SageMaker training job (see ``launch/sagemaker_job.py``): torchrun starts
it in every process of every instance; it runs the recipe with

    --config <config> checkpoint_dir=$SM_CHANNEL_MODEL output_dir=/opt/ml/checkpoints/run
    resume_from_checkpoint=true dp_replicate_degree=<instances> <overrides>

A restarted job (spot interruption, failure) finds its checkpoints in /opt/ml/checkpoints,
synced back from S3, and resumes; parameters are sharded within an instance and replicated
across instances (HSDP), unless the overrides say otherwise. ``$VAR`` in an override is
expanded (``$SM_CHANNEL_DATA``: where the data channel is).
"""

import argparse
import json
import os
import string
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def recipe_argv(config: str, overrides: list[str], env: Mapping[str, str]) -> list[str]:
    """The recipe's command line (after the program name) for this job.

    Raises:
        ValueError: no model channel, or an override that is not ``key=value``.
    """
    if "SM_CHANNEL_MODEL" not in env:
        raise ValueError("no 'model' input channel (SM_CHANNEL_MODEL unset): launch with --channel model=...")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must be key=value, got {bad}")
    hosts = json.loads(env.get("SM_HOSTS", "[]"))
    defaults = {
        "checkpoint_dir": env["SM_CHANNEL_MODEL"],
        "output_dir": "/opt/ml/checkpoints/run",
        "resume_from_checkpoint": "true",
        "dp_replicate_degree": str(max(len(hosts), 1)),
    }
    expanded = [string.Template(o).safe_substitute(env) for o in overrides]
    given = {o.split("=", 1)[0] for o in expanded}
    return ["--config", str(REPO / config)] + [f"{k}={v}" for k, v in defaults.items() if k not in given] + expanded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--overrides", default="[]", help="JSON list of key=value")
    args = parser.parse_args()
    sys.path[:0] = [str(REPO), str(REPO / "recipes")]
    import omnilong_full

    sys.argv = [sys.argv[0]] + recipe_argv(args.config, json.loads(args.overrides), os.environ)
    return omnilong_full.recipe_main()


if __name__ == "__main__":
    sys.exit(main())
