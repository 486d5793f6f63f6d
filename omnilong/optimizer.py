"""The optimizer from the config, with the fastest correct implementation for where its
parameters live.

With ``fsdp_cpu_offload`` (and on a CPU-only run) each rank steps its shard of the
parameters on the CPU. torch's AdamW picks its for-loop implementation for CPU parameters
by default; its fused CPU kernel (torch >= 2.4) is several times faster (docs/benchmarks.md,
"Offloaded optimizer step") and gives the same updates within fp32 rounding
(tests/test_optimizer.py). So a torch Adam or AdamW whose config chooses neither ``fused``
nor ``foreach`` is built with ``fused=True`` when its parameters are on the CPU.
"""

from typing import Any

from omegaconf import DictConfig

# Optimizers whose ``fused=True`` has a CPU kernel.
_FUSED_ON_CPU = ("torch.optim.Adam", "torch.optim.AdamW", "torch.optim.adamw.AdamW", "torch.optim.adam.Adam")


def implementation_kwargs(node: DictConfig, params_on_cpu: bool) -> dict[str, Any]:
    """Keyword arguments to build the optimizer of config ``node`` with: ``{"fused": True}`` for
    a torch Adam/AdamW over CPU parameters whose config leaves the implementation open, else none.

    Args:
        node: the ``optimizer`` config node (``_component_`` and its arguments).
        params_on_cpu: the parameters the optimizer steps are on the CPU (CPU offload or device cpu).
    """
    chosen = any(node.get(key) is not None for key in ("fused", "foreach"))
    if params_on_cpu and node.get("_component_") in _FUSED_ON_CPU and not chosen:
        return {"fused": True}
    return {}
