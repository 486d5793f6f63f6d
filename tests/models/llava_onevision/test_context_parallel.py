"""LLaVA-OneVision under context parallelism equals the model on one device.

Oracle: the same tiny LLaVA-OneVision (tiny random checkpoint) on the unsharded batch, fp32.
Under cp, attention is ring attention over zigzag shards and the SigLIP tower's crops and
frames are spread over the ranks (ImageSplit). The loss is the recipe's: the token-loss sum over the
global count of trained tokens. Tolerance: loss and every parameter's gradient (summed over
cp ranks) within 1e-5.
"""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from omnilong.data import collate_padded, llava_video_sft_dataset, load_tokenizer
from omnilong.hf_io import read_hf_config
from omnilong.models import load_hf_model
from omnilong.models.llava_onevision.parallelize import ImageSplit
from omnilong.models.parallelize import apply_context_parallel
from omnilong.models.vision_tokens import with_vision_token_index
from omnilong.parallel.context_parallel import shard_batch_for_cp
from omnilong.testing.tiny_llava_onevision import TINY_CROP, TINY_PATCH
from tests.cp_share_datasets import llava_dataset, two_samples
from tests.models.llava_onevision.inputs import processor_inputs as _inputs
from tests.models.llava_onevision.inputs import random_image as _image
from tests.models.llava_onevision.inputs import random_video as _video

TOL = 1e-5


def _processor_batch(checkpoint) -> dict[str, torch.Tensor]:
    """An anyres image (base + 2x4 grid crops), two 3-frame videos and text, as the processor
    gives them, with positions and labels added as the recipe's batches have them."""
    inputs = _inputs(
        checkpoint,
        [{"type": "image"}, {"type": "video"}, {"type": "video"}, {"type": "text", "text": "what is in all of these?"}],
        images=[_image(50, 130, seed=1)],
        videos=[_video(3, 40, 60, seed=2), _video(3, 42, 42, seed=3)],
    )
    inputs.pop("attention_mask")
    inputs["position_ids"] = torch.arange(inputs["input_ids"].shape[1])[None]
    inputs["labels"] = torch.randint(0, 1000, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(4))
    return inputs


def _loss(model, batch, global_tokens: int):
    batch = dict(batch)
    labels = batch.pop("labels")
    logits = model(**batch)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / global_tokens


def _one_device(checkpoint, batch) -> tuple[float, dict]:
    """The oracle: loss and every parameter's gradient (None: not in the graph) on one device."""
    model = load_hf_model(checkpoint)
    loss = _loss(model, batch, int((batch["labels"] != -100).sum()))
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


def _cp_worker(rank: int, world_size: int, checkpoint: str, batch: dict, expected: dict) -> dict:
    """``{"loss" or parameter name: max abs error}`` of cp against ``expected`` (loss, grads)."""
    model = load_hf_model(checkpoint)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    apply_context_parallel(read_hf_config(checkpoint), model, mesh["cp"])  # the family picks its tower's split
    assert isinstance(model.visual.split, ImageSplit)
    global_tokens = int((batch["labels"] != -100).sum())
    local = _loss(
        model, shard_batch_for_cp(with_vision_token_index(batch, model.vision_token_ids), mesh["cp"], 0), global_tokens
    )
    local.backward()
    total = local.detach().clone()
    torch.distributed.all_reduce(total)
    errors = {"loss": abs(total.item() - expected["loss"])}
    for name, p in model.named_parameters():
        if expected[name] is None:  # post_layernorm: in neither graph
            errors[name] = 0.0 if p.grad is None else float("inf")
            continue
        torch.distributed.all_reduce(p.grad)
        errors[name] = (p.grad - expected[name]).abs().max().item()
    return errors


def _assert_close(checkpoint, batch, world_size, run_distributed):
    expected_loss, expected = _one_device(checkpoint, batch)
    assert expected["image_newline"] is not None and expected["visual.layers.1.feed_forward.w2.weight"] is not None
    for errors in run_distributed(_cp_worker, world_size, str(checkpoint), batch, {**expected, "loss": expected_loss}):
        assert errors.keys() == {"loss", *expected}
        bad = {k: v for k, v in errors.items() if v > TOL}
        assert not bad, bad


@pytest.mark.parametrize("world_size", [2, 4])
def test_image_and_videos_under_cp_match_one_device(run_distributed, tiny_llava_dir, world_size):
    """9 crops and 6 frames over 2 or 4 ranks; ~100 tokens in zigzag shards."""
    batch = _processor_batch(tiny_llava_dir)
    _assert_close(tiny_llava_dir, batch, world_size, run_distributed)


def test_packed_video_rows_under_cp_match_one_device(run_distributed, tiny_llava_dir, tiny_videos_dir):
    """Two packed rows of the demo videos (several documents each, right padding, then cp
    padding), positions per document computed on the full rows (``with_positions``), 2 ranks."""
    packed = llava_video_sft_dataset(
        load_tokenizer(tiny_llava_dir),
        tiny_videos_dir / "train.jsonl",
        max_seq_len=300,
        fps=2.0,
        max_frames=8,
        frame_size=TINY_CROP,
        patch_size=TINY_PATCH,
        packed=True,
    )
    assert len(packed.rows[0]) > 1
    batch = load_hf_model(tiny_llava_dir).with_positions(
        packed.normalize_pixels(collate_padded([packed[0], packed[1]], packed.pad_id))
    )
    batch.pop("skipped")
    _assert_close(tiny_llava_dir, batch, 2, run_distributed)


def _local_frames_worker(rank: int, world_size: int, checkpoint: str, data, expected: dict) -> dict:
    """The cp run as the recipe makes it: this rank's items from the dataset's cp share (its
    frames only), positions of the full rows, the ranks' agreement on decode failures, the cut."""
    from omnilong.parallel.context_parallel import agree_on_decode_failures

    model = load_hf_model(checkpoint)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    apply_context_parallel(read_hf_config(checkpoint), model, mesh["cp"])
    dataset = llava_dataset(checkpoint, data)
    dataset.decode_cp_share(rank, world_size)
    batch, failed = agree_on_decode_failures(model.with_positions(two_samples(dataset)), mesh["cp"])
    assert failed == [] and batch["pixel_values_videos"].shape[0] == expected["frames"][rank]
    local = _loss(
        model,
        shard_batch_for_cp(with_vision_token_index(batch, model.vision_token_ids), mesh["cp"], 0),
        expected["global_tokens"],
    )
    local.backward()
    total = local.detach().clone()
    torch.distributed.all_reduce(total)
    errors = {"loss": abs(total.item() - expected["loss"])}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
        if expected[name] is None or p.grad is None:
            errors[name] = 0.0 if p.grad is None and expected[name] is None else float("inf")
        else:
            errors[name] = (p.grad - expected[name]).abs().max().item()
    return errors


def test_ranks_given_only_their_frames_match_one_device(run_distributed, tiny_llava_dir, cp_share_videos):
    """2 ranks, each given by the dataset only its frames of each video (31, then 5 and 23
    frames: 15 + 2 + 11 on rank 0, 16 + 3 + 12 on rank 1), equal the one-device run on all frames."""
    dataset = llava_dataset(tiny_llava_dir, cp_share_videos)
    batch = load_hf_model(tiny_llava_dir).with_positions(two_samples(dataset))
    loss, grads = _one_device(tiny_llava_dir, batch)
    expected = {**grads, "loss": loss, "global_tokens": int((batch["labels"] != -100).sum()), "frames": [28, 31]}
    for errors in run_distributed(_local_frames_worker, 2, str(tiny_llava_dir), cp_share_videos, expected):
        bad = {k: v for k, v in errors.items() if v > TOL}
        assert not bad, bad
        assert "visual.layers.1.feed_forward.w2.weight" in errors
