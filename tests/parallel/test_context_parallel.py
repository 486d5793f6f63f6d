"""Context parallelism's generic pieces: putting gathered vision features back in item order, and
the cp ranks' agreement on samples whose video one of them could not decode."""

import torch
from torch.distributed.device_mesh import init_device_mesh

from omnilong.constants import IGNORE_INDEX
from omnilong.parallel.context_parallel import agree_on_decode_failures, item_order


def test_item_order_reads_each_item_rank_by_rank_from_the_gathered_blocks():
    """Blocks of 3 rows; item 0 has 1 row on rank 0 and 2 on rank 1, item 1 has 2 on rank 0 and
    none on rank 1: rank 0's block holds (item 0, item 1, item 1), rank 1's (item 0, item 0, pad)."""
    assert item_order([[1, 2], [2, 0]], longest=3).tolist() == [0, 3, 4, 1, 2]


def _agree_worker(rank: int, world_size: int) -> tuple[list[int], list, list]:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    # row 0: samples 7 (tokens 0-2) and 9 (tokens 3-5) packed; row 1: sample 4, then padding
    failures = torch.zeros(2, 6, dtype=torch.long)
    if rank == 1:
        failures[0, 3:] = 10  # only rank 1 failed to decode sample 9's frames
    if rank == 0:
        failures[1, :4] = 5  # only rank 0 failed on sample 4
    batch = {"labels": torch.arange(12).view(2, 6), "skipped": torch.tensor([0, 0]), "decode_failures": failures}
    agreed, failed = agree_on_decode_failures(batch, mesh["cp"])
    assert "decode_failures" not in agreed
    # plain lists: tensors would travel to the parent as shared memory, whose handle a rank that
    # has already exited can no longer send
    return failed, agreed["labels"].tolist(), agreed["skipped"].tolist()


def test_every_cp_rank_drops_a_sample_that_one_rank_could_not_decode(run_distributed):
    """Oracle: the failures of both ranks together. Every rank ignores the labels of samples 4 and
    9 (only theirs), counts one skipped sample in each row and names the samples' indices."""
    expected_labels = [[0, 1, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX] * 4 + [10, 11]]
    for failed, labels, skipped in run_distributed(_agree_worker, 2):
        assert failed == [4, 9]
        assert labels == expected_labels
        assert skipped == [1, 1]
