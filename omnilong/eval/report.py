"""Evaluation outputs: ``results.json``, progress over items (a bar on a terminal, plain log
lines otherwise), and heatmaps (matplotlib is the ``eval`` extra, which ``scripts/setup.sh``
installs; without it the JSON is written and the log says how to get the picture)."""

import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

logger = logging.getLogger(__name__)
T = TypeVar("T")


#: Seconds between two plain progress lines (the last item always gets one).
PROGRESS_INTERVAL_S = 30.0


def progress(
    items: Iterable[T],
    total: int,
    description: str,
    enabled: bool,
    bar: bool = True,
    interval_s: float = PROGRESS_INTERVAL_S,
    stream: TextIO | None = None,
) -> Iterator[T]:
    """``items``, reporting progress when ``enabled`` (a writing rank): a tqdm bar when ``bar``
    and ``stream`` (default stderr) is a terminal, otherwise a plain log line (done / total,
    items per second, time left) every ``interval_s`` seconds and after the last item, as the
    training loop logs steps (redirected to a file a bar would be one long line)."""
    stream = stream or sys.stderr
    if not enabled:
        return iter(items)
    if bar and stream.isatty():
        return iter(tqdm(items, total=total, desc=description, dynamic_ncols=True, file=stream))
    return _progress_lines(items, total, description, interval_s)


def _progress_lines(items: Iterable[T], total: int, description: str, interval_s: float) -> Iterator[T]:
    start = last = time.monotonic()
    for done, item in enumerate(items, start=1):
        yield item  # the caller works on it; the line after it counts it done
        now = time.monotonic()
        if done == total or now - last >= interval_s:
            last = now
            rate = done / max(now - start, 1e-9)
            logger.info(
                "%s: %d/%d items (%.0f%%), %.3g items/s, %s left",
                description,
                done,
                total,
                100 * done / max(total, 1),
                rate,
                _clock(max(total - done, 0) / rate),
            )


def _clock(seconds: float) -> str:
    """``h:mm:ss``."""
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Write ``results`` as indented JSON (the directory is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def grid_accuracy(records: Sequence[dict], row_key: str, column_key: str, score_key: str) -> dict[str, Any]:
    """Mean of ``score_key`` per ``(row, column)`` cell of ``records``.

    Returns:
        ``{"rows": [...], "columns": [...], "accuracy": [[...]]}``, rows and columns sorted,
        ``None`` for an empty cell.
    """
    rows = sorted({r[row_key] for r in records})
    columns = sorted({r[column_key] for r in records})
    cells: dict[tuple, list[float]] = {}
    for r in records:
        cells.setdefault((r[row_key], r[column_key]), []).append(float(r[score_key]))
    accuracy = [[(sum(cells[(a, b)]) / len(cells[(a, b)])) if (a, b) in cells else None for b in columns] for a in rows]
    return {"rows": rows, "columns": columns, "accuracy": accuracy}


def write_heatmaps(path: Path, grids: dict[str, dict[str, Any]], row_label: str, column_label: str) -> bool:
    """One heatmap panel per named grid (:func:`grid_accuracy`), depth down, length across,
    green = found. Returns whether the PNG was written (False without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning(
            'matplotlib is not installed: %s not drawn (pip install -e ".[eval]"; the numbers are in results.json)',
            path,
        )
        return False
    fig, axes = plt.subplots(1, len(grids), figsize=(6 * len(grids), 4.5), squeeze=False)
    for ax, (title, grid) in zip(axes[0], grids.items()):
        values = [[float("nan") if v is None else v for v in row] for row in grid["accuracy"]]
        transposed = [list(col) for col in zip(*values)]  # columns (depth) down, rows (length) across
        image = ax.imshow(transposed, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
        ax.set_xticks(range(len(grid["rows"])), [str(r) for r in grid["rows"]], rotation=45)
        ax.set_yticks(range(len(grid["columns"])), [f"{c:g}" for c in grid["columns"]])
        ax.set_xlabel(row_label)
        ax.set_ylabel(column_label)
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
