"""The training DataLoader's options (``OmniLongFullRecipe._loader_options``): pinned batches on
CUDA, workers kept across epochs with the configured prefetch depth, spawned workers when
they decode video on CUDA; the batch's copy to the device (``_on_device``)."""

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


def test_video_pixels_travel_as_uint8_and_are_normalised_on_the_device(tiny_qwen_dir, tiny_videos_dir):
    """Oracle: transformers' processor's pixels (``process_video``, bit for bit); the loader's batch
    holds them as uint8, and the step's copy to the device (``_on_device``) makes them the model's."""
    from omnilong.data import collate_padded, decode_video, load_tokenizer, process_video, video_sft_dataset
    from omnilong.data.video_sft import read_video_samples
    from omnilong.testing.tiny_qwen2_5_vl import TINY_MAX_PIXELS, TINY_MIN_PIXELS

    recipe = OmniLongFullRecipe.__new__(OmniLongFullRecipe)
    recipe.device = torch.device("cpu")
    data = tiny_videos_dir / "train.jsonl"
    dataset = video_sft_dataset(
        load_tokenizer(tiny_qwen_dir), data, 512, video_min_pixels=TINY_MIN_PIXELS, video_max_pixels=TINY_MAX_PIXELS
    )
    batch = collate_padded([dataset[0]], dataset.pad_id)
    assert batch["pixel_values_videos"].dtype == torch.uint8
    on_device = recipe._on_device(batch, dataset)
    clip = decode_video(next(iter(read_video_samples(data))).videos[0])
    height, width = (int(n) * 14 for n in batch["video_grid_thw"][0, 1:])
    assert torch.equal(on_device["pixel_values_videos"], process_video(clip, height, width)["pixel_values_videos"])
    assert torch.equal(on_device["input_ids"], batch["input_ids"])
    text = {"input_ids": torch.ones(1, 4, dtype=torch.long)}
    assert torch.equal(recipe._on_device(text, object())["input_ids"], text["input_ids"])  # no pixels: copied only
