"""Shared fixtures: multi-process launch on gloo, tiny random checkpoints, an attention
oracle and a host-sync guard."""

import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.fork_server import adopt, fork_server_context

# Tests run on CPU; keep each process to one thread so that 4 ranks share 2 cores well.
torch.set_num_threads(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, env: dict, cwd: str) -> None:
    adopt(env, cwd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
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
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes on gloo, forked from
    the session's server that imported torch and OmniLong once (``tests/fork_server.py``).

    ``fn`` must be a module-level function; its return values (picklable) come back
    as a list indexed by rank. A failure on any rank raises with that rank's traceback.
    """
    ctx = fork_server_context()
    queue = ctx.Queue()
    port = _free_port()
    here = (dict(os.environ), os.getcwd())
    procs = [
        ctx.Process(target=_rank_entry, args=(r, world_size, port, fn, args, queue, *here)) for r in range(world_size)
    ]
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


def pytest_collection_modifyitems(items: list) -> None:
    """Tests that start processes through ``run_distributed`` or ``shared_run`` are ``slow``
    (``pytest -m "not slow"`` leaves them out); other slow tests carry the mark themselves."""
    for item in items:
        if {"run_distributed", "shared_run"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def run_distributed() -> Callable:
    """The :func:`spawn_ranks` launcher, for multi-process tests on gloo."""
    return spawn_ranks


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory) -> Callable:
    """``tune run`` of one configuration once per session, for the tests that need the same run
    (an uninterrupted run that a resumed one must equal, a one-process oracle, a killed run to
    resume): ``shared_run(config, overrides, nproc=1, fault=None)`` -> its ``output_dir``, after
    checking that it succeeded or, with ``fault`` (the recipe's injected SIGKILL, ``FAULT_ENV``),
    that it was killed. ``overrides`` has no ``output_dir``; the folder is shared: read it, or
    copy it to change it."""
    from omnilong.checkpoint.training_state import FAULT_ENV
    from tests.recipe_runs import recipe_run

    runs: dict[tuple, tuple] = {}

    def run(config: str, overrides: dict, nproc: int = 1, fault: str | None = None) -> Path:
        key = (config, nproc, fault, tuple(sorted((k, str(v)) for k, v in overrides.items())))
        if key not in runs:
            output_dir = tmp_path_factory.mktemp("shared_run") / "out"
            env = {**os.environ, FAULT_ENV: fault} if fault else None
            runs[key] = recipe_run(config, {**overrides, "output_dir": output_dir}, nproc=nproc, env=env), output_dir
        result, output_dir = runs[key]
        assert (result.returncode != 0) if fault else (result.returncode == 0), result.stderr[-3000:]
        return output_dir

    return run


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL HF checkpoint + tokenizer (nested config layout)."""
    from omnilong.testing.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl

    return write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_flat_dir(tmp_path_factory) -> Path:
    """The same tiny checkpoint with the published flat config.json layout."""
    from omnilong.testing.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl

    return write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen_flat"), seed=0, nested_config=False)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A tiny random LLaVA-OneVision HF checkpoint + tokenizer + processor (hub layout)."""
    from omnilong.testing.tiny_llava_onevision import write_tiny_llava_onevision

    return write_tiny_llava_onevision(tmp_path_factory.mktemp("tiny_llava"), seed=0)


@pytest.fixture(scope="session")
def tiny_videos_dir(tmp_path_factory) -> Path:
    """Short generated videos (a coloured square moving) and a train.jsonl of conversations."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("tiny_videos")
    tool = Path(__file__).resolve().parents[1] / "tools" / "make_tiny_videos.py"
    subprocess.run([sys.executable, str(tool), "--output", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def cp_share_videos(tmp_path_factory) -> Path:
    """``train.jsonl`` of two samples over random-noise videos at 8 fps, 56x84: one of 31 frames
    (16 frame pairs, the last completed by repetition: several pairs for each of 4 cp ranks) and
    one of a 5-frame and a 23-frame video; next to it ``corrupt_tail.mp4``, in no sample."""
    import json

    from torchcodec.encoders import VideoEncoder

    root = tmp_path_factory.mktemp("cp_share_videos")
    for name, frames in (("long.mp4", 31), ("short.mp4", 5), ("mid.mp4", 23)):
        noise = torch.randint(
            0, 256, (frames, 3, 56, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(frames)
        )
        VideoEncoder(noise, frame_rate=8.0).to_file(root / name)
    turns = lambda n: [  # noqa: E731
        {"from": "human", "value": "<video>\n" * n + "What is shown?"},
        {"from": "gpt", "value": "Noise, frame after frame."},
    ]
    samples = [
        {"video": "long.mp4", "conversations": turns(1)},
        {"video": ["short.mp4", "mid.mp4"], "conversations": turns(2)},
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    # corrupt_tail.mp4: long.mp4 with the last quarter of its frame data zeroed: its metadata
    # (31 frames) reads, its first frames decode, its last ones do not
    data = bytearray((root / "long.mp4").read_bytes())
    start, end = data.find(b"mdat") + 4, data.find(b"moov") - 4
    data[start + (end - start) * 3 // 4 : end] = bytes(end - (start + (end - start) * 3 // 4))
    (root / "corrupt_tail.mp4").write_bytes(data)
    return root / "train.jsonl"


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids=None) -> torch.Tensor:
    """Causal attention with an explicit ``[B, 1, T, T]`` mask (same document and key <= query),
    in the inputs' dtype on the CPU math path: an oracle independent of OmniLong's kernels.
    ``q [B, Hq, T, D]``, ``k, v [B, Hkv, T, D]``, ``document_ids [B, T]`` or None."""
    t = q.shape[2]
    visible = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()[None]
    if document_ids is not None:
        visible = visible & (document_ids[:, :, None] == document_ids[:, None, :])
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=visible[:, None], enable_gqa=q.shape[1] != k.shape[1]
        )


@pytest.fixture
def masked_attention() -> Callable:
    """Reference attention with an explicit mask (see :func:`_masked_attention`)."""
    return _masked_attention


@pytest.fixture
def no_host_sync() -> Callable:
    """The CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``: a context manager
    inside which any host read of a tensor raises (:func:`omnilong.testing.host_syncs.no_host_sync`)."""
    from omnilong.testing.host_syncs import no_host_sync

    return no_host_sync


@pytest.fixture(scope="session")
def tiny_inference(tiny_qwen_dir):
    """The tiny checkpoint loaded for inference (fp32, CPU) and its evaluation family
    (4 frames per video at most)."""
    from omnilong.eval.family import family_for
    from omnilong.generation.loading import load_inference_model

    loaded = load_inference_model(tiny_qwen_dir, torch.device("cpu"), torch.float32)
    return loaded, family_for("qwen2_5_vl", loaded.tokenizer, loaded.model_dir, max_frames=4)


@pytest.fixture(scope="session")
def tiny_llava_inference(tiny_llava_dir):
    """The tiny LLaVA-OneVision checkpoint loaded for inference (fp32, CPU) and its evaluation
    family (4 frames per video at most)."""
    from omnilong.eval.family import family_for
    from omnilong.generation.loading import load_inference_model

    loaded = load_inference_model(tiny_llava_dir, torch.device("cpu"), torch.float32)
    return loaded, family_for("llava_onevision", loaded.tokenizer, loaded.model_dir, max_frames=4)


@pytest.fixture(params=["qwen2_5_vl", "llava_onevision"])
def family_inference(request):
    """Each model family's tiny checkpoint loaded for inference, with its family
    (:func:`tiny_inference`, :func:`tiny_llava_inference`)."""
    return request.getfixturevalue(
        {"qwen2_5_vl": "tiny_inference", "llava_onevision": "tiny_llava_inference"}[request.param]
    )


# ---------------------------------------------------------------- this checkout's code
REPO = Path(__file__).resolve().parents[1]
CHECKOUT_PATHS = (str(REPO), str(REPO / "recipes"))


def _run_this_checkout() -> None:
    """Put this checkout's ``omnilong`` and ``recipes/omnilong_full.py`` first on the import
    path of this process and, through ``PYTHONPATH``, of every process a test starts (``tune
    run``, torchrun's ranks, spawned ranks, tools). Without it they import whatever the
    editable install points at, so a second checkout would silently test the first one's code."""
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in CHECKOUT_PATHS]
    os.environ["PYTHONPATH"] = os.pathsep.join([*CHECKOUT_PATHS, *inherited])
    sys.path[:] = [*CHECKOUT_PATHS, *(p for p in sys.path if p not in CHECKOUT_PATHS)]


_run_this_checkout()
