"""The optimizer's implementation choice (``omnilong.optimizer``).

Oracle for the fused CPU AdamW: torch's for-loop AdamW (the CPU default) from the same
start; tolerance: parameters within 1e-6 relative + 1e-7 absolute after 5 steps (fp32
rounding of a different operation order).
"""

import pytest
import torch
from omegaconf import OmegaConf

from omnilong.optimizer import implementation_kwargs


def _train(fused: bool, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((257, 33), (33,), (1000,))]
    optimizer = torch.optim.AdamW(
        params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **({"fused": True} if fused else {"foreach": False})
    )
    grads = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=grads)
        optimizer.step()
    return [p.detach() for p in params]


def test_fused_cpu_adamw_matches_the_for_loop_adamw():
    for fused, loop in zip(_train(fused=True), _train(fused=False)):
        assert torch.allclose(fused, loop, rtol=1e-6, atol=1e-7)
        assert not torch.equal(fused, torch.zeros_like(fused))


@pytest.mark.parametrize(
    "node, on_cpu, expected",
    [
        ({"_component_": "torch.optim.AdamW", "lr": 1e-5}, True, {"fused": True}),
        ({"_component_": "torch.optim.Adam"}, True, {"fused": True}),
        ({"_component_": "torch.optim.AdamW"}, False, {}),  # parameters on the GPU: torch's own default
        ({"_component_": "torch.optim.AdamW", "foreach": True}, True, {}),  # the config chose
        ({"_component_": "torch.optim.AdamW", "fused": False}, True, {}),
        ({"_component_": "torch.optim.SGD", "lr": 0.1}, True, {}),  # not an Adam: as configured
    ],
)
def test_fused_is_chosen_only_for_cpu_adam_left_open_by_the_config(node, on_cpu, expected):
    assert implementation_kwargs(OmegaConf.create(node), on_cpu) == expected
