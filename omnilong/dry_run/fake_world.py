"""The world of a dry run: one process standing for rank 0 of a job of any size, fake
tensors for everything big, real tensors for everything the host reads.

* :func:`init_fake_process_group`: a process group of ``world_size`` ranks whose collectives
  do nothing (``torch.testing._internal.distributed.fake_pg``), so the mesh, FSDP2's sharding
  and the ring are built for the real world size by one process.
* :func:`fake_tensors`: inside, tensor factories and every op with a fake input make fake
  tensors (shapes, dtypes and strides, no memory: ``FakeTensorMode``), while an op whose
  inputs are all real runs for real (:class:`RealWhereReal`). The batch's token ids, labels,
  document ids and vision grids stay real, so everything the host reads from them (the
  attention plan, M-RoPE positions, trained-token counts, the vision tower's windows) is
  computed exactly as in a run, and only what depends on weights or pixels is fake.
"""

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from omnilong.kernel_device import simulate_device


def init_fake_process_group(world_size: int, rank: int = 0) -> None:
    """The default process group: ``world_size`` ranks of which this process is ``rank``;
    collectives return at once and move nothing."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers the "fake" backend)

    dist.init_process_group("fake", rank=rank, world_size=world_size, store=dist.HashStore())


_REAL_FACTORY_BYTES = 64 << 20


class RealWhereReal(TorchDispatchMode):
    """Runs an op for real when it has tensor inputs and none is fake, or when it makes integer
    tensors from nothing (``arange`` of a mesh, cumulative lengths; up to 64 MiB); otherwise
    passes it to the fake tensor mode below (float factories, and ops on weights, activations
    or pixels)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if not tensors and _small_integers(out):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return out


def _small_integers(out) -> bool:
    """Whether ``out`` holds only integer or boolean tensors of at most 64 MiB."""
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    return bool(outputs) and all(
        not (t.is_floating_point() or t.is_complex()) and t.numel() * t.element_size() <= _REAL_FACTORY_BYTES
        for t in outputs
    )


@contextlib.contextmanager
def _dtensor_metadata_outside_the_fake_mode() -> Iterator[None]:
    """DTensor computes an op's global output shapes by running it on fake global-shape tensors
    in the active fake mode if there is one; the memory tracker would count those as allocations
    of the run. Step out of the dry run's mode there, so that DTensor makes its own fake mode,
    whose tensors the tracker leaves out (as it does in a run without fake tensors)."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    original = ShardingPropagator._propagate_tensor_meta_non_cached

    def outside_the_fake_mode(propagator, op_schema):
        with unset_fake_temporarily():
            return original(propagator, op_schema)

    ShardingPropagator._propagate_tensor_meta_non_cached = outside_the_fake_mode
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = original


@contextlib.contextmanager
def fake_tensors(simulated_device: str) -> Iterator[FakeTensorMode]:
    """Fake tensors for what has no real input (see the module's docstring), computed with
    ``simulated_device``'s kernels (:func:`omnilong.kernel_device.simulate_device`)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, RealWhereReal(), simulate_device(simulated_device), _dtensor_metadata_outside_the_fake_mode():
        yield mode
