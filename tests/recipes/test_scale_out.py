"""Multi-node training, on one machine: two "nodes" (a ``tune run`` and an ``omnilong run``
launch with ``--nnodes 2``, one process each, meeting by c10d rendezvous on 127.0.0.1: either
launcher joins the other's job) training with HSDP
(``dp_replicate_degree=2``: parameters replicated across the nodes, sharded within).

Oracle: one node with two processes and the same degrees; per-step losses and gradient norms
within 1e-6 relative (the same ranks compute the same sums; only the launch differs).
"""

import os
import socket
import subprocess

import pytest

from tests.recipe_runs import OMNILONG, STAGE1, TUNE, metrics, recipe_run

pytestmark = pytest.mark.slow


def _overrides(tiny_qwen_dir, output_dir) -> list[str]:
    return [
        f"checkpoint_dir={tiny_qwen_dir}",
        f"output_dir={output_dir}",
        "max_seq_len=96",
        "max_steps=2",
        "dataset.max_files=10",
        "shuffle=false",
        "gradient_accumulation_steps=1",
        "dp_replicate_degree=2",
        "save_hf_at_end=false",
        "save_every_n_steps=null",
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_with_hsdp_match_one_node(tiny_qwen_dir, tmp_path):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                *([TUNE, "run"] if rank == 0 else [OMNILONG, "run"]),
                "--nnodes",
                "2",
                "--node_rank",
                str(rank),
                "--nproc_per_node",
                "1",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                f"127.0.0.1:{port}",
                "--rdzv_id",
                "omnilong-test",
                *(["omnilong_full"] if rank == 0 else []),
                "--config",
                STAGE1,
                *_overrides(tiny_qwen_dir, tmp_path / "two_nodes"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    one_node = recipe_run(
        STAGE1, dict(o.split("=", 1) for o in _overrides(tiny_qwen_dir, tmp_path / "one_node")), nproc=2
    )
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    reference, two = metrics(tmp_path / "one_node"), metrics(tmp_path / "two_nodes")
    assert [m["step"] for m in two] == [1, 2]
    for a, b in zip(reference, two):
        assert a["num_tokens"] == b["num_tokens"]
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * abs(a["grad_norm"]), (a, b)
