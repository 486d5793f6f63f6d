"""The cluster launchers in ``launch/``, without a cluster or AWS: the SageMaker launcher's
estimator arguments and the entry point's recipe command line; the SLURM script's launch
command, with ``srun``/``scontrol`` replaced by recorders on PATH. Not run here: a real
SageMaker job, ``sagemaker.pytorch.PyTorch`` itself (the SDK is not installed), sbatch."""

import json
import os
import subprocess
import sys

import pytest

from tests.recipe_runs import REPO

sys.path.insert(0, str(REPO / "launch"))
import sagemaker_entry  # noqa: E402
import sagemaker_job as launcher  # noqa: E402

CONFIG = "configs/qwen2_5_vl_7b/stage1_text.yaml"
BASE = [
    "--config",
    CONFIG,
    "--role",
    "arn:aws:iam::1:role/r",
    "--checkpoint-s3",
    "s3://b/ckpt",
    "--channel",
    "model=s3://b/qwen",
    "--instance-count",
    "2",
]


def test_estimator_runs_the_entry_point_with_torchrun_on_every_instance():
    plan = launcher.estimator_arguments(
        launcher.parse_args(
            BASE
            + [
                "--channel",
                "data=fsx://fs-0abc/mnt1/text",
                "--subnets",
                "subnet-1",
                "--security-group-ids",
                "sg-1",
                "max_steps=10",
                "dataset.data_files=[$SM_CHANNEL_DATA/a.jsonl]",
            ]
        )
    )
    est = plan["estimator"]
    assert est["entry_point"] == "launch/sagemaker_entry.py" and est["source_dir"] == str(REPO)
    assert est["distribution"] == {"torch_distributed": {"enabled": True}}
    assert est["instance_count"] == 2 and est["instance_type"] == "ml.p5.48xlarge"
    assert est["checkpoint_s3_uri"] == "s3://b/ckpt" and est["checkpoint_local_path"] == "/opt/ml/checkpoints"
    assert est["hyperparameters"] == {
        "config": CONFIG,
        "overrides": json.dumps(["max_steps=10", "dataset.data_files=[$SM_CHANNEL_DATA/a.jsonl]"]),
    }
    assert est["subnets"] == ["subnet-1"] and est["security_group_ids"] == ["sg-1"]
    assert plan["channels"] == {
        "model": {"kind": "s3", "uri": "s3://b/qwen"},
        "data": {"kind": "fsx", "file_system_id": "fs-0abc", "directory_path": "/mnt1/text"},
    }


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--channel", "data"], "--channel 'data': use name=s3://bucket/prefix or name=fsx://"),
        (["--channel", "data=/local/path"], "--channel 'data=/local/path'"),
        (["--channel", "data=fsx://fs-1/mnt"], "needs --subnets and --security-group-ids"),
    ],
)
def test_bad_channels_are_named_with_the_accepted_forms(extra, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*").replace("[", r"\[")):
        launcher.estimator_arguments(launcher.parse_args(BASE + extra))


def test_config_must_be_inside_the_uploaded_repository():
    args = launcher.parse_args(BASE[2:] + ["--config", "/tmp/x.yaml"])
    with pytest.raises(ValueError, match="give a config file inside the repository"):
        launcher.estimator_arguments(args)


def test_without_the_sdk_the_launcher_says_how_to_install_it_and_dry_run_works():
    run = subprocess.run([sys.executable, "launch/sagemaker_job.py", *BASE], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and "pip install '.[sagemaker]'" in run.stderr
    dry = subprocess.run(
        [sys.executable, "launch/sagemaker_job.py", *BASE, "--dry-run"], capture_output=True, text=True, cwd=REPO
    )
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["estimator"]["distribution"] == {"torch_distributed": {"enabled": True}}


def test_entry_point_builds_the_recipe_command_line_from_the_job_environment():
    env = {
        "SM_CHANNEL_MODEL": "/opt/ml/input/data/model",
        "SM_CHANNEL_DATA": "/opt/ml/input/data/data",
        "SM_HOSTS": json.dumps(["algo-1", "algo-2"]),
    }
    argv = sagemaker_entry.recipe_argv(CONFIG, ["dataset.data_files=[$SM_CHANNEL_DATA/a.jsonl]", "max_steps=5"], env)
    assert argv == [
        "--config",
        str(REPO / CONFIG),
        "checkpoint_dir=/opt/ml/input/data/model",
        "output_dir=/opt/ml/checkpoints/run",
        "resume_from_checkpoint=true",
        "dp_replicate_degree=2",
        "dataset.data_files=[/opt/ml/input/data/data/a.jsonl]",
        "max_steps=5",
    ]
    # An override replaces the default instead of repeating the key.
    argv = sagemaker_entry.recipe_argv(CONFIG, ["dp_replicate_degree=1"], env)
    assert [a for a in argv if a.startswith("dp_replicate_degree")] == ["dp_replicate_degree=1"]
    with pytest.raises(ValueError, match="no 'model' input channel"):
        sagemaker_entry.recipe_argv(CONFIG, [], {})


def test_slurm_script_launches_one_torchrun_per_node_with_c10d_on_the_first_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    (bin_dir / "srun").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/srun_args\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "77",
        "SLURM_SUBMIT_DIR": str(REPO),
    }
    run = subprocess.run(
        ["bash", "launch/slurm.sbatch", CONFIG, "max_steps=3"], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert run.returncode == 0, run.stderr
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert args == [
        "--kill-on-bad-exit=1",
        f"{REPO}/.venv/bin/tune",
        "run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "8",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "node-a:29500",
        "--rdzv_id",
        "77",
        "omnilong_full",
        "--config",
        CONFIG,
        "dp_replicate_degree=2",
        "resume_from_checkpoint=true",
        "max_steps=3",
    ]
    usage = subprocess.run(["bash", "launch/slurm.sbatch"], capture_output=True, text=True, env=env, cwd=REPO)
    assert usage.returncode == 2 and "usage: sbatch" in usage.stderr
