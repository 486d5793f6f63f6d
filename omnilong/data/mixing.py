"""Weighted mixing of several datasets into one, deterministically."""

import bisect
from collections.abc import Sequence

from torch.utils.data import Dataset


def rows_per_source(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """How many rows of an epoch each source gives: the epoch has ``M = sum(sizes)`` rows and
    source ``i`` gives ``n_i = M * w_i / sum(w)`` of them, rounded by largest remainder (ties
    to the earlier source) so that the ``n_i`` add up to ``M`` exactly.

    Raises:
        ValueError: lengths differ, a weight is not positive, or a source is empty.
    """
    if len(sizes) != len(weights) or not sizes:
        raise ValueError(f"need one weight per source, got {len(sizes)} sources and {len(weights)} weights")
    if any(not w > 0 for w in weights):
        raise ValueError(f"source weights must be positive numbers, got {list(weights)}")
    if any(s <= 0 for s in sizes):
        raise ValueError(f"every source needs at least one row, got sizes {list(sizes)}")
    total, weight_sum = sum(sizes), sum(weights)
    exact = [total * w / weight_sum for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


class WeightedMix(Dataset):
    """Several datasets as one, each contributing a share of rows set by its weight.

    Index space: ``[0, M)`` with ``M`` = the sources' rows added up; source ``i`` owns the
    ``n_i`` indices (:func:`rows_per_source`) after those of sources ``0..i-1``, and its
    ``k``-th one is its row ``floor(k * len_i / n_i)``: a source with more weight than rows
    repeats every row ``floor`` or ``ceil`` of ``n_i / len_i`` times, one with less gives
    evenly spaced rows. The mapping depends on nothing but sizes and weights (no RNG), so
    the sampler's seeded order over ``[0, M)`` and its resume position fully decide the
    data order. A row never mixes sources (each source packs its own rows).

    Args:
        datasets: the sources (same ``pad_id``).
        weights: one positive weight per source (normalised here).

    Raises:
        ValueError: see :func:`rows_per_source`; sources with different ``pad_id``.
    """

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float]):
        self.datasets = list(datasets)
        self.sizes = [len(d) for d in self.datasets]
        self.counts = rows_per_source(self.sizes, weights)
        pad_ids = {d.pad_id for d in self.datasets}
        if len(pad_ids) != 1:
            raise ValueError(
                f"the mixed sources pad with different ids {sorted(pad_ids)}; prepare them with one tokenizer"
            )
        self.pad_id = pad_ids.pop()
        self.num_skipped = sum(getattr(d, "num_skipped", 0) for d in self.datasets)
        self._starts = [0]
        for n in self.counts:
            self._starts.append(self._starts[-1] + n)

    def __len__(self) -> int:
        return self._starts[-1]

    def source_row(self, index: int) -> tuple[int, int]:
        """``(source, row)`` that mixed row ``index`` reads."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        i = bisect.bisect_right(self._starts, index) - 1
        k = index - self._starts[i]
        return i, k * self.sizes[i] // self.counts[i]

    def __getitem__(self, index: int):
        source, row = self.source_row(index)
        return self.datasets[source][row]
