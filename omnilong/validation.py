"""Held-out loss: the loss of a validation split under the run's data- and context-parallel layout.

``val_loss`` = summed token loss over the whole split / its count of trained (non-ignored)
tokens, both summed over every rank: the same normalization as the training loss, so the
two are comparable. Every data-parallel rank runs the same number of batches (collectives
inside the model need every rank); a rank short of rows gets copies whose labels are all
ignored, so no row is counted twice.
"""

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from omnilong.constants import IGNORE_INDEX


class HeldOutShard(Dataset):
    """Data-parallel rank ``rank``'s share of ``dataset``: rows ``rank, rank + R, ...`` in
    order, padded to ``ceil(N / R)`` rows (the same on every rank) with copies of the split's
    first rows whose ``labels`` are all ``IGNORE_INDEX``.

    Args:
        dataset: the split; items are dicts with ``labels [T]``.
        num_replicas: ``R``, the number of data-parallel ranks.
        rank: this rank among them.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        if len(dataset) == 0:
            raise ValueError("validation_dataset is empty: give it data or remove the key")
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.num_replicas)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of a shard of {len(self)} rows")
        position = index * self.num_replicas + self.rank
        if position < len(self.dataset):
            return self.dataset[position]
        item = self.dataset[position % len(self.dataset)]
        return {**item, "labels": torch.full_like(item["labels"], IGNORE_INDEX)}


@torch.no_grad()
def held_out_loss(
    model: torch.nn.Module, loss_fn: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device
) -> tuple[float, int]:
    """``(val_loss, val_tokens)`` over ``batches`` of every rank, without gradients.

    Args:
        model: the (sharded) model; called as ``model(**batch, return_hidden=True)``.
        loss_fn: ``loss_fn(hidden, weight, labels) -> (loss_sum, count)``.
        batches: this rank's model-ready batches (``input_ids [B, T]``, ``labels [B, T]``, ...).
        device: where the model runs.

    Returns:
        The summed token loss over all ranks / the all-reduced trained-token count (0 when
        no token is trained), and that count.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)  # summed loss, trained tokens
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items() if k != "skipped"}
        labels = batch.pop("labels")
        hidden = model(**batch, return_hidden=True)
        loss_sum, _ = loss_fn(hidden, model.output.weight.detach(), labels)
        totals += torch.stack([loss_sum.double().cpu(), (labels != IGNORE_INDEX).sum().double().cpu()])
    dist.all_reduce(totals)  # dp ranks hold other rows, cp ranks other shards of the same rows
    model.train(was_training)
    loss, tokens = float(totals[0]), int(totals[1])
    return loss / max(tokens, 1), tokens
