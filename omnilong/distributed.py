"""Process-group setup for one process or many (torchrun / `tune run --nproc_per_node`)."""

import gc
import os
import socket
from collections.abc import Mapping

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


def cpu_threads_per_rank(requested: int | None, environ: Mapping[str, str], cores: int) -> tuple[int, str]:
    """How many intra-op CPU threads this rank uses (the offloaded optimizer step, CPU compute),
    and why.

    torchrun (and so ``tune run --nproc_per_node N``) sets ``OMP_NUM_THREADS=1`` in every rank
    when it starts more than one process on a node and the variable is unset, which would leave
    each rank's CPU AdamW step on one core of a many-core host. So, unless the config asks for a
    number, the ranks of a node share its cores: ``cores // LOCAL_WORLD_SIZE``. An
    ``OMP_NUM_THREADS`` the user set is kept; the one value that cannot be told apart from
    torchrun's default (``1`` with several ranks on the node) is treated as that default.

    Args:
        requested: the config's ``cpu_threads_per_rank`` (a positive integer, or None: automatic).
        environ: the process environment (``OMP_NUM_THREADS``, ``LOCAL_WORLD_SIZE``).
        cores: CPU cores this process may run on.
    """
    if requested is not None:
        return requested, "cpu_threads_per_rank"
    local_ranks = int(environ.get("LOCAL_WORLD_SIZE", 1))
    omp = environ.get("OMP_NUM_THREADS")
    if omp is not None and not (omp == "1" and local_ranks > 1):
        return max(1, int(omp)), "OMP_NUM_THREADS"
    return max(1, cores // local_ranks), f"{cores} cores / {local_ranks} ranks on this node"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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


def shutdown_distributed(mesh: DeviceMesh | None = None) -> None:
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
