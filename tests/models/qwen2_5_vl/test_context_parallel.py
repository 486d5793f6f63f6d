"""The whole model under context parallelism equals the model on one device.

Oracle: the same tiny Qwen2.5-VL (tiny random checkpoint) on the unsharded batch, fp32.
Under cp, attention is ring attention over zigzag shards and the vision tower's frame pairs
are spread over the ranks (VisionFrameSplit). Tolerance: loss and every parameter's
gradient (summed over cp ranks) within 1e-5; vision features exactly the ones of the
single-device tower within 1e-6.
"""

import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from omnilong.hf_io import read_hf_config
from omnilong.models import load_hf_model
from omnilong.models.parallelize import apply_context_parallel
from omnilong.models.qwen2_5_vl.model import Qwen2_5_VL
from omnilong.models.qwen2_5_vl.parallelize import VisionFrameSplit
from omnilong.models.vision_tokens import with_vision_token_index
from omnilong.parallel.context_parallel import shard_batch_for_cp
from tests.cp_share_datasets import qwen_dataset, two_samples

TOL = 1e-5


def _multimodal_batch(model: Qwen2_5_VL, seq_len: int = 61) -> dict[str, torch.Tensor]:
    """Text, an image (grid 1x4x4: 4 tokens), text, a video (grid 3x4x6: 18 tokens), text."""
    args, g = model.args, torch.Generator().manual_seed(0)
    patch_dim = model.visual.args.patch_dim
    image_grid, video_grid = torch.tensor([[1, 4, 4]]), torch.tensor([[3, 4, 6]])
    text = lambda n: torch.randint(0, 200, (n,), generator=g)  # noqa: E731
    ids = torch.cat(
        [
            text(5),
            torch.tensor([args.vision_start_token_id] + [args.image_token_id] * 4),
            text(7),
            torch.tensor([args.vision_start_token_id] + [args.video_token_id] * 18),
            text(seq_len - 5 - 5 - 7 - 19),
        ]
    )[None]
    batch = {
        "input_ids": ids,
        "labels": torch.randint(0, args.vocab_size, ids.shape, generator=g),
        "pixel_values": torch.randn(16, patch_dim, generator=g),
        "image_grid_thw": image_grid,
        "pixel_values_videos": torch.randn(72, patch_dim, generator=g),
        "video_grid_thw": video_grid,
        "second_per_grid_ts": torch.tensor([1.0]),
    }
    batch["labels"][ids == args.video_token_id] = -100
    batch["position_ids"] = model.multimodal_position_ids(ids, image_grid, video_grid, batch["second_per_grid_ts"])
    return batch


def _loss_sum(model, batch):
    batch = dict(batch)
    labels = batch.pop("labels")
    logits = model(**batch)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")


def _errors_summed_over_ranks(local, expected, model, reference) -> dict:
    """``{"loss": |sum over the cp ranks of local - expected|, name: max |sum over the ranks of
    the parameter's gradient - the one-device gradient|}``."""
    total = local.detach().clone()
    torch.distributed.all_reduce(total)
    errors = {"loss": (total - expected.detach()).abs().item()}
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        grad = p.grad.clone()
        torch.distributed.all_reduce(grad)
        errors[name] = (grad - ref.grad).abs().max().item()
    return errors


def _cp_worker(rank: int, world_size: int, checkpoint: str) -> dict:
    torch.manual_seed(0)
    reference = load_hf_model(checkpoint)
    reference.visual.requires_grad_(True)
    model = copy.deepcopy(reference)
    batch = _multimodal_batch(reference)
    expected = _loss_sum(reference, batch)
    expected.backward()

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    apply_context_parallel(read_hf_config(checkpoint), model, mesh["cp"])
    assert isinstance(model.visual.split, VisionFrameSplit)  # the family picks its tower's split
    shard = shard_batch_for_cp(with_vision_token_index(batch, model.vision_token_ids), mesh["cp"], pad_token_id=0)
    local = _loss_sum(model, shard)
    local.backward()
    return _errors_summed_over_ranks(local, expected, model, reference)


@pytest.mark.parametrize("world_size", [2, 4])
def test_multimodal_model_under_cp_matches_one_device(run_distributed, tiny_qwen_dir, world_size):
    """Zigzag shards of 61 tokens (padded to a multiple of 2 * cp), an image and a 3-frame-pair
    video split over the ranks (with 4 ranks one frame-pair run is empty on some rank)."""
    for errors in run_distributed(_cp_worker, world_size, str(tiny_qwen_dir)):
        assert errors["loss"] <= TOL * 100, errors["loss"]  # a sum over ~60 tokens
        bad = {k: v for k, v in errors.items() if k != "loss" and v > TOL}
        assert not bad, bad
        assert any(k.startswith("visual.layers") for k in errors)


def _split_worker(rank: int, world_size: int, checkpoint: str) -> float:
    visual = load_hf_model(checkpoint).visual
    g = torch.Generator().manual_seed(1)
    grids = torch.tensor([[1, 4, 4], [3, 4, 6], [2, 6, 4]])
    pixels = torch.randn(16 + 72 + 48, visual.args.patch_dim, generator=g)
    expected = visual(pixels, grids)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    visual.split = VisionFrameSplit(mesh["cp"], visual.args.spatial_merge_size)
    return (visual(pixels, grids) - expected).abs().max().item()


def test_vision_frame_split_gives_every_rank_every_feature(run_distributed, tiny_qwen_dir):
    assert max(run_distributed(_split_worker, 4, str(tiny_qwen_dir))) <= 1e-6


def _one_device_and_cp_models(checkpoint: str, batch: dict, world_size: int):
    """The one-device reference (its vision tower trained, ``batch``'s loss backpropagated), a copy
    of it with context parallelism over a cp mesh of ``world_size``, the reference's loss and the mesh."""
    reference = load_hf_model(checkpoint)
    reference.visual.requires_grad_(True)
    model = copy.deepcopy(reference)
    expected = _loss_sum(reference, batch)
    expected.backward()
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    apply_context_parallel(read_hf_config(checkpoint), model, mesh["cp"])
    return reference, model, expected, mesh


def _packed_cp_worker(rank: int, world_size: int, checkpoint: str, batch: dict) -> dict:
    reference, model, expected, mesh = _one_device_and_cp_models(checkpoint, batch, world_size)
    local = _loss_sum(model, shard_batch_for_cp(with_vision_token_index(batch, model.vision_token_ids), mesh["cp"], 0))
    local.backward()
    return _errors_summed_over_ranks(local, expected, model, reference)


def test_packed_video_rows_under_cp_match_one_device(run_distributed, tiny_qwen_dir, tiny_videos_dir):
    """Two packed rows of the demo videos (several documents each, right padding, then cp
    padding), M-RoPE positions per document computed on the full rows by the recipe, zigzag
    shards over 2 ranks."""

    from omnilong.data import collate_padded, load_tokenizer, video_sft_dataset

    packed = video_sft_dataset(
        load_tokenizer(tiny_qwen_dir),
        tiny_videos_dir / "train.jsonl",
        max_seq_len=300,
        video_min_pixels=3136,
        video_max_pixels=12544,
        packed=True,
    )
    assert len(packed.rows[0]) > 1
    batch = load_hf_model(tiny_qwen_dir).with_positions(
        packed.normalize_pixels(collate_padded([packed[0], packed[1]], packed.pad_id))
    )
    batch.pop("skipped")
    for errors in run_distributed(_packed_cp_worker, 2, str(tiny_qwen_dir), batch):
        assert errors["loss"] <= TOL * 100, errors["loss"]  # a sum over ~500 tokens
        bad = {k: v for k, v in errors.items() if k != "loss" and v > TOL}
        assert not bad, bad


def _local_pixels_worker(rank: int, world_size: int, checkpoint: str, data, batch: dict) -> dict:
    """The cp run as the recipe makes it: this rank's items from the dataset's cp share (its
    pixels only), positions of the full rows, the ranks' agreement on decode failures, the cut."""
    from omnilong.parallel.context_parallel import agree_on_decode_failures

    reference, model, expected, mesh = _one_device_and_cp_models(checkpoint, batch, world_size)
    dataset = qwen_dataset(checkpoint, data)
    dataset.decode_cp_share(rank, world_size)
    local_batch = model.with_positions(two_samples(dataset))
    local_batch, failed = agree_on_decode_failures(local_batch, mesh["cp"])
    assert failed == []
    assert local_batch["pixel_values_videos"].shape[0] < batch["pixel_values_videos"].shape[0] / 2
    local = _loss_sum(
        model, shard_batch_for_cp(with_vision_token_index(local_batch, model.vision_token_ids), mesh["cp"], 0)
    )
    local.backward()
    return _errors_summed_over_ranks(local, expected, model, reference)


def test_ranks_given_only_their_frame_pairs_match_one_device(run_distributed, tiny_qwen_dir, cp_share_videos):
    """4 ranks, each given by the dataset only its frame pairs (a 16-pair video: 4 each; a 3-pair
    and a 12-pair video in the other row) equal the one-device run on every frame's pixels."""
    dataset = qwen_dataset(tiny_qwen_dir, cp_share_videos)
    batch = load_hf_model(tiny_qwen_dir).with_positions(two_samples(dataset))
    for errors in run_distributed(_local_pixels_worker, 4, str(tiny_qwen_dir), cp_share_videos, batch):
        assert errors["loss"] <= TOL * 100, errors["loss"]
        bad = {k: v for k, v in errors.items() if k != "loss" and v > TOL}
        assert not bad, bad
        assert any(k.startswith("visual.layers") for k in errors)


def test_vision_batch_without_its_token_index_is_refused():
    """A shard could not tell which features its pad tokens take: the model's
    ``with_vision_token_index`` must run on the full sequence first (no mesh is reached)."""
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "pixel_values_videos": torch.zeros(4, 6)}
    with pytest.raises(ValueError, match="with_vision_token_index"):
        shard_batch_for_cp(batch, cp_mesh=None, pad_token_id=0)
