"""Process-group setup for one process or many (torchrun / `tune run --nproc_per_node`)."""

import gc
import os
import socket
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> this rank's CUDA device when there is one, else CPU.

    Raises:
        ValueError: ``"cuda"`` asked for on a machine without CUDA, or an unknown name.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: cuda was asked for but CUDA is not available; use device: cpu or auto")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")


def init_distributed(device: torch.device) -> None:
    """Start the default process group: gloo on CPU; ``cuda:nccl,cpu:gloo`` on CUDA, since
    collectives on CPU-offloaded tensors (gradient clipping, loss reduction) need a CPU backend.
    A single process started without torchrun gets a one-rank group of its own."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)


def shutdown_distributed(mesh: Optional[DeviceMesh] = None) -> None:
    """Destroy every process group and let its threads end now, while the interpreter is alive.

    ``destroy_process_group`` unregisters the groups, but a Gloo group's worker and transport
    threads live until the group's last reference is gone, and a ``DeviceMesh`` keeps one (its
    root's group registry) for as long as any DTensor cache holds the mesh, i.e. until the
    interpreter is torn down. A worker thread that then releases the tensors of a finished
    collective needs the GIL, which a finalizing interpreter does not grant: the thread is
    unwound through a ``noexcept`` destructor and the process aborts after a run that finished
    every step ("terminate called without an active exception", SIGABRT). Dropping the mesh's
    references here destroys the groups and joins their threads first.

    Args:
        mesh: the root device mesh the run built, if any.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    registry = getattr(mesh, "_pg_registry", None)  # torch >= 2.9: the root mesh's name -> group map
    if registry:
        registry.clear()
    gc.collect()
