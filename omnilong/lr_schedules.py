"""Learning-rate schedules for the ``lr_scheduler`` config key."""

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine_schedule_with_warmup(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
) -> LambdaLR:
    """The learning rate rises linearly from 0 over ``num_warmup_steps``, then follows a cosine
    over the remaining steps: down to 0 at ``num_training_steps`` with the default half cycle.

    The same schedule, arguments and ``LambdaLR`` state as torchtune's
    ``get_cosine_schedule_with_warmup`` (tests/test_lr_schedules.py), so a checkpoint of either
    resumes with the other; importing this one does not import torchtune.

    Args:
        optimizer: the optimizer whose learning rate is scheduled.
        num_warmup_steps: steps of linear warmup from 0.
        num_training_steps: the run's steps (the recipe passes ``max_steps``).
        num_cycles: cosine periods over the steps after warmup (0.5: one decline to 0).
        last_epoch: the last step done, when building a scheduler for a resumed run.
    """

    def lr_multiple(step: int) -> float:
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)))

    return LambdaLR(optimizer, lr_multiple, last_epoch)
