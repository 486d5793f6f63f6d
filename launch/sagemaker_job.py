"""Launch an OmniLong training job on Amazon SageMaker: a PyTorch estimator with torchrun
distribution (``torch_distributed``), the model and data as input channels (S3 prefixes
copied in, or FSx for Lustre mounted), checkpoints written to ``/opt/ml/checkpoints`` and
synced to S3 (a restarted job resumes from them).

    python launch/sagemaker_job.py --config configs/qwen2_5_vl_7b/stage1_text.yaml \\
        --role arn:aws:iam::123456789012:role/SageMakerRole --image-uri <ECR image with `pip install .`> \\
        --instance-type ml.p5.48xlarge --instance-count 2 \\
        --channel model=s3://bucket/Qwen2.5-VL-7B-Instruct --channel data=fsx://fs-0123/abcdefgh/long-text \\
        --checkpoint-s3 s3://bucket/omnilong/stage1 \\
        'dataset.sources=[$SM_CHANNEL_DATA]' max_steps=1000
    python launch/sagemaker_job.py ... --dry-run    # print the estimator's arguments, start nothing

Needs the SageMaker Python SDK v2 (``pip install '.[sagemaker]'``), only on the machine that
launches; ``--dry-run`` does not. In the job, every process runs ``launch/sagemaker_entry.py``,
which turns the hyperparameters into the recipe's command line.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"


def parse_channel(spec: str) -> tuple[str, dict[str, str]]:
    """``name=s3://bucket/prefix`` or ``name=fsx://<file system id>/<mount name>/<path>`` ->
    ``(name, {"kind": "s3" | "fsx", ...})``.

    Raises:
        ValueError: naming the malformed spec and the accepted forms.
    """
    name, sep, uri = spec.partition("=")
    forms = "use name=s3://bucket/prefix or name=fsx://<file system id>/<mount name>/<path>"
    if not sep or not name.isidentifier():
        raise ValueError(f"--channel {spec!r}: {forms}")
    if uri.startswith("s3://") and len(uri) > len("s3://"):
        return name, {"kind": "s3", "uri": uri}
    if uri.startswith("fsx://"):
        parts = uri[len("fsx://") :].split("/", 1)
        if len(parts) == 2 and parts[0].startswith("fs-") and parts[1]:
            return name, {"kind": "fsx", "file_system_id": parts[0], "directory_path": "/" + parts[1]}
    raise ValueError(f"--channel {spec!r}: {forms}")


def estimator_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``sagemaker.pytorch.PyTorch`` and the channels of ``fit``,
    as plain data: ``{"estimator": {...}, "channels": {name: spec}}``."""
    config = Path(args.config)
    if not (REPO / config).is_file() or config.is_absolute():
        raise ValueError(
            f"--config {args.config}: give a config file inside the repository (it is uploaded "
            f"with it), relative to {REPO}"
        )
    channels = dict(parse_channel(spec) for spec in args.channel)
    if "model" not in channels:
        raise ValueError("--channel model=...: the base model checkpoint (HF directory) is required")
    estimator = {
        "entry_point": "launch/sagemaker_entry.py",
        "source_dir": str(REPO),
        "role": args.role,
        "instance_type": args.instance_type,
        "instance_count": args.instance_count,
        "distribution": {"torch_distributed": {"enabled": True}},  # torchrun on every instance
        "hyperparameters": {"config": str(config), "overrides": json.dumps(args.overrides)},
        "checkpoint_s3_uri": args.checkpoint_s3,
        "checkpoint_local_path": CHECKPOINT_LOCAL_PATH,
        "max_run": args.max_run_hours * 3600,
        "volume_size": args.volume_gb,
        "base_job_name": args.job_name,
        # a spot interruption's SIGTERM: torchrun lets the ranks finish their step and write a
        # checkpoint for this long before killing them (torch >= 2.12; 30 s before)
        "environment": {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "110"},
    }
    if args.image_uri:
        estimator["image_uri"] = args.image_uri
    else:
        estimator.update(framework_version=args.framework_version, py_version=args.py_version)
    if any(c["kind"] == "fsx" for c in channels.values()):
        if not (args.subnets and args.security_group_ids):
            raise ValueError(
                "an fsx:// channel needs --subnets and --security-group-ids (the job runs in the file system's VPC)"
            )
        estimator.update(subnets=args.subnets, security_group_ids=args.security_group_ids)
    return {"estimator": estimator, "channels": channels}


def _inputs(channels: dict[str, dict[str, str]]) -> dict[str, Any]:
    from sagemaker.inputs import FileSystemInput, TrainingInput

    return {
        name: TrainingInput(c["uri"])
        if c["kind"] == "s3"
        else FileSystemInput(
            file_system_id=c["file_system_id"],
            file_system_type="FSxLustre",
            directory_path=c["directory_path"],
            file_system_access_mode="ro",
        )
        for name, c in channels.items()
    }


def _comma_list(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe config, relative to the repository")
    parser.add_argument("--role", required=True, help="IAM role ARN the job runs as")
    parser.add_argument("--instance-type", default="ml.p5.48xlarge")
    parser.add_argument("--instance-count", type=int, default=1)
    parser.add_argument(
        "--image-uri", help="training image with OmniLong's dependencies (else a SageMaker PyTorch DLC)"
    )
    parser.add_argument("--framework-version", default="2.11")
    parser.add_argument("--py-version", default="py312")
    parser.add_argument(
        "--channel",
        action="append",
        default=[],
        help="name=s3://... or name=fsx://fs-id/mount/path; mounted at $SM_CHANNEL_<NAME>",
    )
    parser.add_argument("--checkpoint-s3", required=True, help="S3 prefix that /opt/ml/checkpoints syncs to")
    parser.add_argument("--subnets", type=_comma_list, default=[], help="comma-separated (fsx:// channels)")
    parser.add_argument("--security-group-ids", type=_comma_list, default=[], help="comma-separated (fsx:// channels)")
    parser.add_argument("--max-run-hours", type=int, default=72)
    parser.add_argument("--volume-gb", type=int, default=500)
    parser.add_argument("--job-name", default="omnilong")
    parser.add_argument("--dry-run", action="store_true", help="print the estimator's arguments as JSON; start nothing")
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides ($SM_CHANNEL_* expanded in the job)")
    args = parser.parse_args(argv)
    if args.instance_count < 1:
        parser.error("--instance-count must be >= 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        plan = estimator_arguments(args)
    except ValueError as e:
        print(f"sagemaker launcher: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(plan, indent=2))
        return 0
    try:
        from sagemaker.pytorch import PyTorch
    except ImportError:
        print(
            "sagemaker launcher: error: the SageMaker Python SDK v2 is not installed: "
            "pip install '.[sagemaker]' (or use --dry-run)",
            file=sys.stderr,
        )
        return 2
    estimator = PyTorch(**plan["estimator"])
    estimator.fit(_inputs(plan["channels"]), wait=False)
    print(f"started {estimator.latest_training_job.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
