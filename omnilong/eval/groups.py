"""Data-parallel evaluation: the ranks of a run in groups, items dealt to the groups, one
results file.

Under torchrun with ``--cp-degree C`` the ``W`` ranks form ``W / C`` groups of ``C``
consecutive ranks (:func:`omnilong.generation.loading.load_inference_model` builds their
meshes); each group is one copy of the model whose ranks are one context-parallel group
running the same items. Pick ``C`` for the longest input (the fewest ranks whose memory holds
it); the default, ``C = W``, is one group of all ranks.

Items are dealt by key, all items of a key to the same group (Video-MME: a video's questions
in both subtitle settings, so that one group decodes and encodes its frames once), the keys
balanced by cost, longest first: keys in decreasing total cost (ties in the order first
seen), each to the group with the least cost so far (ties to the lower group). With equal
costs this is round robin over the keys. A group runs its items in the order given.

One results file, no two processes writing the same file: each group's first rank (its
writer) appends its rows (one JSON line each, flushed) to a part file of its own,
``<file>.group<g>``; at the end the rows of all groups are gathered and rank 0 appends them to
the results file in item order, then deletes the parts. With one group its writer appends to
the results file itself. A run stopped before the end leaves part files; the next run that
resumes first folds their rows into the results file (a torn last line dropped), skipping
rows the file already holds verbatim (a stop between that append and the deletion), so no
finished row is lost or written twice. Rows name their item, so two equal rows are one.

A group that finishes early waits for the others in a gloo group of its own with a timeout
of :data:`WAIT_FOR_GROUPS` (the default group's, 10-30 minutes, could expire first).
"""

import json
import logging
import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from omnilong.eval.report import progress
from omnilong.generation.loading import InferenceModel
from omnilong.jsonl import read_appended_jsonl

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: How long a group that is done waits for the slowest one.
WAIT_FOR_GROUPS = timedelta(hours=48)


@dataclass(frozen=True)
class GroupLayout:
    """Where this rank is: group ``group`` of ``groups``, cp rank ``cp_rank`` of ``cp_degree``."""

    group: int = 0
    groups: int = 1
    cp_rank: int = 0
    cp_degree: int = 1

    @classmethod
    def of(cls, loaded: InferenceModel) -> "GroupLayout":
        """The layout ``loaded`` was built with (ranks ``g * cp_degree ..`` are group ``g``)."""
        if not dist.is_initialized():
            return cls()
        cp = 1 if loaded.cp_mesh is None else loaded.cp_mesh.size()
        rank = dist.get_rank()
        return cls(rank // cp, dist.get_world_size() // cp, rank % cp, cp)

    @property
    def writes(self) -> bool:
        """Whether this rank writes its group's rows (its first cp rank)."""
        return self.cp_rank == 0


def deal(keys: Sequence[Hashable], costs: Sequence[float], groups: int) -> list[int]:
    """The group of each item, items of one key together (see the module's docstring).

    Args:
        keys: each item's key.
        costs: each item's cost (any unit; a key costs the sum of its items').
        groups: number of groups.

    Returns:
        ``[len(keys)]`` group indices in ``0..groups-1``.
    """
    totals: dict[Hashable, float] = {}
    for key, cost in zip(keys, costs, strict=True):
        totals[key] = totals.get(key, 0.0) + cost
    load = [0.0] * groups
    owner = {}
    for key in sorted(totals, key=lambda k: -totals[k]):  # stable: equal costs keep their first-seen order
        group = min(range(groups), key=lambda g: (load[g], g))
        owner[key] = group
        load[group] += totals[key]
    return [owner[key] for key in keys]


def part_files(path: Path) -> list[Path]:
    """The groups' part files of the results file ``path`` (any run's), sorted."""
    return sorted(path.parent.glob(f"{path.name}.group*"))


def _append_missing(path: Path, lines: Sequence[str]) -> int:
    """Append to ``path`` the JSON ``lines`` it does not hold yet (its torn last line cut
    first), flushed to disk; returns how many were appended."""
    held = {json.dumps(r) for r in read_appended_jsonl(path)} if path.is_file() else set()
    new = [line for line in dict.fromkeys(lines) if line not in held]
    with path.open("a") as f:
        f.writelines(line + "\n" for line in new)
        f.flush()
        os.fsync(f.fileno())
    return len(new)


class GroupResults:
    """One run's rows, made by every group, kept in one JSON-lines file (module docstring).

    Every rank constructs it and calls :meth:`finish`, in the same order (collectives); the
    loop runs ``for item in results.run(items, ...)`` and calls :meth:`write` for the rows of
    the current item.

    Args:
        loaded: the model (its layout: :meth:`GroupLayout.of`).
        path: the results file (``answers.jsonl``, ``results.jsonl``).
        resume: keep the rows already in ``path`` (and fold leftover part files into it);
            ``False`` starts it empty.
    """

    def __init__(self, loaded: InferenceModel, path: Path, resume: bool):
        self.layout = GroupLayout.of(loaded)
        self._is_main = loaded.is_main
        self.path = path
        self._rows: list[tuple[int, str]] = []  # (item index, JSON line) of this run, in write order
        self._current = -1
        several = dist.is_initialized() and dist.get_world_size() > 1
        self._wait = dist.new_group(backend="gloo", timeout=WAIT_FOR_GROUPS) if several else None
        if loaded.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume:
                parts = part_files(path)
                if parts:
                    lines = [json.dumps(r) for p in parts for r in read_appended_jsonl(p, False)]
                    folded = _append_missing(path, lines)
                    for part in parts:
                        part.unlink()
                    logger.info("%s: folded %d rows of %d part file(s) left by a stopped run", path, folded, len(parts))
            else:
                for stale in [path, *part_files(path)]:
                    stale.unlink(missing_ok=True)
        self.barrier()  # the file is whole before any rank reads it
        self._own = path if self.layout.groups == 1 else path.with_name(f"{path.name}.group{self.layout.group}")
        self._file = None  # opened by run(): a caller may still cut or move the results file before

    def barrier(self) -> None:
        """Wait until every rank of the run is here (no-op in a single process)."""
        if self._wait is not None:
            dist.barrier(group=self._wait)

    def run(
        self,
        items: Sequence[T],
        description: str,
        key: Callable[[T], Hashable] | None = None,
        cost: Callable[[T], float] | None = None,
    ) -> Iterator[T]:
        """This group's share of ``items`` (:func:`deal`; ``key`` default: each item its own,
        ``cost`` default: 1), in order, with progress from its writer (a bar on a terminal when
        there is one group, else plain log lines)."""
        keys = [key(x) if key else i for i, x in enumerate(items)]
        owner = deal(keys, [cost(x) if cost else 1.0 for x in items], self.layout.groups)
        mine = [i for i, g in enumerate(owner) if g == self.layout.group]
        if self.layout.writes and self._file is None:
            self._file = self._own.open("a")
        label = description
        if self.layout.groups > 1:
            label = f"{description} [group {self.layout.group + 1}/{self.layout.groups}]"
            if self.layout.writes:
                logger.info("%s: %d of the %d items", label, len(mine), len(items))
        for index in progress(mine, len(mine), label, self.layout.writes, bar=self.layout.groups == 1):
            self._current = index
            yield items[index]

    def write(self, row: dict[str, Any]) -> None:
        """Record ``row`` for the current item; the group's writer appends it to its file now."""
        line = json.dumps(row)
        self._rows.append((self._current, line))
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()

    def total(self, value: int) -> int:
        """The sum over groups of ``value`` (each group's, e.g. a count of work done)."""
        if self.layout.groups == 1:
            return value
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value if self.layout.writes else 0, group=self._wait)
        return sum(values)

    def finish(self) -> list[dict[str, Any]]:
        """Every group's rows of this run, in item order, on every rank (waits for all groups);
        rank 0 has appended them to the results file and deleted the part files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self._is_main:
            self.path.touch()  # a run with nothing to do still leaves its (maybe empty) results file
        rows = self._rows
        if self.layout.groups > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows if self.layout.writes else [], group=self._wait)
            rows = sorted((r for share in gathered for r in share), key=lambda r: r[0])
            if dist.get_rank() == 0:
                _append_missing(self.path, [line for _, line in rows])
                for part in part_files(self.path):
                    part.unlink()
        return [json.loads(line) for _, line in rows]
