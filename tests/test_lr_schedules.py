"""The learning-rate schedules; oracle: torchtune's schedule of the same name, exactly."""

import pytest
import torch

from omnilong.lr_schedules import cosine_schedule_with_warmup


def _lrs(make_scheduler, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("warmup, total, cycles", [(4, 40, 0.5), (0, 10, 0.5), (3, 12, 1.0), (10, 5, 0.5)])
def test_cosine_with_warmup_equals_torchtunes(warmup, total, cycles):
    from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

    ours = _lrs(lambda o: cosine_schedule_with_warmup(o, warmup, total, num_cycles=cycles), total + 3)
    theirs = _lrs(lambda o: get_cosine_schedule_with_warmup(o, warmup, total, num_cycles=cycles), total + 3)
    assert ours == theirs
    assert ours[0] == (0.0 if warmup else 0.1) and max(ours) <= 0.1


def test_a_checkpoint_of_torchtunes_schedule_resumes_with_this_one():
    from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

    def stepped(make_scheduler, state=None):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = make_scheduler(optimizer)
        if state is not None:
            optimizer.load_state_dict(state[0])
            scheduler.load_state_dict(state[1])
        return optimizer, scheduler

    optimizer, theirs = stepped(lambda o: get_cosine_schedule_with_warmup(o, 2, 10))
    for _ in range(5):
        optimizer.step()
        theirs.step()
    resumed_optimizer, ours = stepped(
        lambda o: cosine_schedule_with_warmup(o, 2, 10), (optimizer.state_dict(), theirs.state_dict())
    )
    for _ in range(3):
        optimizer.step(), theirs.step()
        resumed_optimizer.step(), ours.step()
        assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
