"""Resume restores each rank's random generators.

The recipe's DataLoader draws its base seed from the global torch generator every time it
starts an epoch (it seeds the loader's workers with it), so the generator state is part of the
training state. Oracle: the state each rank had when it saved (distinct per rank), compared
exactly after the ranks have drawn from their generators in between.
"""

import torch
from omegaconf import OmegaConf

from omnilong.checkpoint.training_state import load_training_state, save_training_state


def _save_draw_load(rank, world_size, output_dir):
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)
    torch.rand(rank + 1)  # each rank somewhere else in its stream
    saved = torch.get_rng_state()
    expected_draw = torch.rand(8)
    torch.set_rng_state(saved)
    path = save_training_state(
        output_dir,
        1,
        model,
        optimizer,
        None,
        {"step": 1, "epoch": 0, "consumed": 0, "num_skipped": 0},
        OmegaConf.create({}),
        keep_last_n=1,
        run_id="test",
    )
    torch.rand(1000)  # training goes on (or a new process starts from its seed)
    torch.manual_seed(0)
    trainer = load_training_state(path, model, optimizer, None)
    return trainer["step"], saved, torch.get_rng_state(), expected_draw, torch.rand(8)


def test_resume_restores_each_ranks_torch_generator(run_distributed, tmp_path):
    results = run_distributed(_save_draw_load, 2, tmp_path)
    for step, saved, restored, expected_draw, draw in results:
        assert step == 1
        assert torch.equal(restored, saved)
        assert torch.equal(draw, expected_draw)
    assert not torch.equal(results[0][1], results[1][1])  # per-rank states, not one shared file
