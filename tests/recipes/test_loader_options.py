"""The training DataLoader's options (``OmniLongFullRecipe._loader_options``): pinned batches on
CUDA, workers kept across epochs with the configured prefetch depth, spawned workers when
they decode video on CUDA."""

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from omnilong_full import OmniLongFullRecipe


def _options(device: str, num_workers: int, **dataset) -> dict:
    recipe = OmniLongFullRecipe.__new__(OmniLongFullRecipe)
    recipe.cfg = OmegaConf.create({"num_workers": num_workers, "prefetch_factor": 1, "dataset": dataset})
    recipe.device = torch.device(device)
    return recipe._loader_options()


def test_without_workers_only_pinning_follows_the_device():
    assert _options("cpu", 0) == {"num_workers": 0, "pin_memory": False}
    assert _options("cuda", 0) == {"num_workers": 0, "pin_memory": True}
    DataLoader(range(4), **_options("cpu", 0))  # accepted as it is


@pytest.mark.parametrize("decode_device, context", [("cpu", None), ("cuda", "spawn")])
def test_workers_persist_prefetch_one_sample_and_spawn_for_cuda_decoding(decode_device, context):
    options = _options("cuda", 4, decode_device=decode_device)
    assert options == {
        "num_workers": 4,
        "pin_memory": True,
        "persistent_workers": True,
        "prefetch_factor": 1,
        "multiprocessing_context": context,
    }
    DataLoader(range(4), **options)  # accepted as it is (no worker starts before iterating)
