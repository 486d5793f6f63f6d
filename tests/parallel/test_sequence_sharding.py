"""The zigzag layout: positions, padding, shard -> unshard round trip.

Oracle: the layout's definition (rank r holds chunks r and 2*cp-1-r) written out by hand.
"""

import pytest
import torch

from omnilong.constants import IGNORE_INDEX
from omnilong.parallel.sequence_sharding import (
    contiguous_positions,
    pad_batch,
    pad_to_shardable,
    padded_length,
    shard_batch,
    shard_sequence,
    unshard_sequence,
    zigzag_positions,
)


def test_zigzag_positions_are_chunks_r_and_mirror():
    assert zigzag_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert zigzag_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert zigzag_positions(16, 1, 4).tolist() == [2, 3, 12, 13]
    assert contiguous_positions(8, 1, 2).tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_layouts_partition_the_sequence(cp):
    seq_len = padded_length(37, cp)
    for layout in (zigzag_positions, contiguous_positions):
        held = torch.cat([layout(seq_len, r, cp) for r in range(cp)])
        assert sorted(held.tolist()) == list(range(seq_len))


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_zigzag_gives_every_rank_the_same_causal_work(cp):
    """A query at position p attends p + 1 keys; contiguous pieces are unbalanced."""

    def work(layout):
        return [int((layout(16 * cp, r, cp) + 1).sum()) for r in range(cp)]

    assert len(set(work(zigzag_positions))) == 1
    assert len(set(work(contiguous_positions))) == cp


def test_padded_length_rounds_up_to_twice_cp():
    assert [padded_length(n, 2) for n in (1, 4, 5, 8)] == [4, 4, 8, 8]
    assert padded_length(13, 4) == 16


@pytest.mark.parametrize("cp", [2, 4])
def test_shard_unshard_round_trip(cp):
    tokens = torch.arange(2 * 24).view(2, 24)  # [B, T]
    mrope = torch.arange(3 * 2 * 24).view(3, 2, 24)  # [3, B, T]
    heads = torch.randn(2, 3, 24, 5)  # [B, H, T, D], sequence dim 2
    for x, dim in ((tokens, -1), (mrope, -1), (heads, 2)):
        shards = [shard_sequence(x, r, cp, dim=dim) for r in range(cp)]
        assert all(s.shape[dim] == 24 // cp for s in shards)
        torch.testing.assert_close(unshard_sequence(shards, dim=dim), x, rtol=0, atol=0)


def test_shard_holds_the_zigzag_positions():
    x = torch.arange(16)[None]  # value == position
    assert shard_sequence(x, 3, 4)[0].tolist() == zigzag_positions(16, 3, 4).tolist()


def test_pad_batch_pads_every_sequence_tensor():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9]]),
        "labels": torch.tensor([[6, 7, 8, 9, 1]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1]]).expand(3, 1, 5),  # M-RoPE [3, B, T]
        "document_ids": torch.tensor([[0, 0, 0, 1, 1]]),
        "pixel_values": torch.ones(2, 3),
    }
    padded = pad_batch(batch, cp=2, pad_token_id=0)
    assert padded["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert padded["labels"].tolist() == [[6, 7, 8, 9, 1] + [IGNORE_INDEX] * 3]
    assert padded["position_ids"].shape == (3, 1, 8)
    assert padded["position_ids"][:, 0, 5:].tolist() == [[0, 1, 2]] * 3
    # Padding is a document of its own: no real token shares its id.
    assert padded["document_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    assert padded["pixel_values"] is batch["pixel_values"]


def test_pad_batch_leaves_divisible_lengths_alone():
    batch = {"input_ids": torch.arange(8)[None], "labels": torch.arange(8)[None]}
    padded = pad_batch(batch, cp=2)
    assert all(torch.equal(padded[k], batch[k]) for k in batch)


def test_shard_batch_shards_sequence_keys_only():
    batch = pad_batch(
        {"input_ids": torch.arange(6)[None], "labels": torch.arange(6)[None], "pixel_values": torch.ones(2, 3)}, cp=2
    )
    shard = shard_batch(batch, rank=1, cp=2)
    assert shard["input_ids"].tolist() == [[2, 3, 4, 5]]
    assert shard["labels"].tolist() == [[2, 3, 4, 5]]
    assert shard["pixel_values"] is batch["pixel_values"]
    assert shard_batch(batch, rank=0, cp=2)["labels"].tolist() == [[0, 1, IGNORE_INDEX, IGNORE_INDEX]]


def test_pad_to_shardable_pads_any_dim():
    x = torch.ones(1, 2, 5, 3)
    padded = pad_to_shardable(x, cp=2, value=0, dim=2)
    assert padded.shape == (1, 2, 8, 3) and padded[:, :, 5:].abs().sum() == 0


def test_unpadded_length_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match="pad it first"):
        shard_sequence(torch.arange(6)[None], 0, 2)
