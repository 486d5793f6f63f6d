"""Which device's kernels compute a tensor: its own device's, except in a dry run.

A dry run (:mod:`omnilong.dry_run`) runs the real code on fake CPU tensors standing for the
GPU the run is planned for (FSDP2 on a fake CUDA mesh would need a CUDA driver for its
streams). Inside :func:`simulate_device`, code that picks a kernel by device (the attention
entry point, the loss's GEMMs) picks the simulated device's kernel for fake tensors, so that
shapes, dtypes and signatures of the CUDA kernels are checked and their outputs held as the
GPU would hold them. Real tensors keep their own device's kernels.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor

_simulated: str | None = None


def kernel_device_type(tensor: torch.Tensor) -> str:
    """``"cuda"``, ``"cpu"``, ...: the device type whose kernels compute ``tensor``."""
    if _simulated is not None and isinstance(tensor, FakeTensor):
        return _simulated
    return tensor.device.type


@contextlib.contextmanager
def simulate_device(device_type: str) -> Iterator[None]:
    """Fake tensors are computed with ``device_type``'s kernels while inside."""
    global _simulated
    previous, _simulated = _simulated, device_type
    try:
        yield
    finally:
        _simulated = previous
