"""Shared fixtures: multi-process launch on gloo, tiny random checkpoints."""

import os
import socket
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Tests run on CPU; keep each process to one thread so that 4 ranks share 2 cores well.
torch.set_num_threads(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, result, None))
    except BaseException:  # report any failure to the parent instead of hanging it
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes on gloo.

    ``fn`` must be a module-level function; its return values (picklable) come back
    as a list indexed by rank. A failure on any rank raises with that rank's traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world_size, port, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, result, error = queue.get(timeout=timeout)
            if error is not None:
                errors.append(f"rank {rank}:\n{error}")
                break
            results[rank] = result
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed test failed on " + "\n".join(errors))
    return [results[r] for r in range(world_size)]


@pytest.fixture
def run_distributed() -> Callable:
    """The :func:`spawn_ranks` launcher, for multi-process tests on gloo."""
    return spawn_ranks


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL HF checkpoint + tokenizer (nested config layout)."""
    from omnilong.models.qwen2_5_vl.tiny_checkpoint import write_tiny_qwen2_5_vl

    return write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_flat_dir(tmp_path_factory) -> Path:
    """The same tiny checkpoint with the published flat config.json layout."""
    from omnilong.models.qwen2_5_vl.tiny_checkpoint import write_tiny_qwen2_5_vl

    return write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen_flat"), seed=0, nested_config=False)


@pytest.fixture(scope="session")
def tiny_videos_dir(tmp_path_factory) -> Path:
    """Short generated videos (a coloured square moving) and a train.jsonl of conversations."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("tiny_videos")
    tool = Path(__file__).resolve().parents[1] / "tools" / "make_tiny_videos.py"
    subprocess.run([sys.executable, str(tool), "--output", str(out)], check=True, capture_output=True)
    return out
