"""The held-out split's per-rank shards (the loss itself: tests/recipes/test_validation.py)."""

import pytest
import torch

from omnilong.constants import IGNORE_INDEX
from omnilong.validation import HeldOutShard


def _rows(n):
    return [{"input_ids": torch.full((4,), i), "labels": torch.full((4,), i)} for i in range(n)]


@pytest.mark.parametrize("n, ranks", [(5, 2), (3, 4), (1, 2), (6, 3)])
def test_every_row_is_trained_exactly_once_and_every_rank_gets_the_same_number(n, ranks):
    shards = [HeldOutShard(_rows(n), ranks, r) for r in range(ranks)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-n // ranks)
    trained = [int(item["input_ids"][0]) for s in shards for item in s if (item["labels"] != IGNORE_INDEX).any()]
    assert sorted(trained) == list(range(n))
    padded = [item for s in shards for item in s if (item["labels"] == IGNORE_INDEX).all()]
    assert len(padded) == len(shards) * len(shards[0]) - n


def test_rank_takes_rows_in_order_with_stride():
    assert [int(item["input_ids"][0]) for item in HeldOutShard(_rows(7), 3, 1)] == [1, 4, 0]


def test_an_empty_split_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="validation_dataset is empty"):
        HeldOutShard([], 2, 0)
