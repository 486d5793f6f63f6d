"""Reading back JSON-lines files that a run appends to one record at a time (``metrics.jsonl``,
an evaluation's ``answers.jsonl``), after a crash that may have cut the last write short."""

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("omnilong")


def read_appended_jsonl(path: Path, repair: bool = True) -> list[Any]:
    """The records of ``path``, one JSON value per line (blank lines are ignored).

    A torn last line (no newline at the end and not JSON: the process stopped while writing
    it) is dropped with a warning saying so; with ``repair`` it is also cut from the file, so
    that the next record appended starts on a line of its own. A last line that is whole JSON
    but lacks its newline gets one (with ``repair``). Let only the one process that appends
    to ``path`` repair it.

    Raises:
        ValueError: any other line that is not JSON, naming ``path``, the line number and
            the parser's message.
    """
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            records.append(_parse(path, number, line))
    if not tail.strip():
        return records
    try:
        records.append(json.loads(tail))
    except ValueError:
        logger.warning(
            "%s: dropped its torn last line %d (%d bytes without a newline, not JSON: the writer "
            "stopped in the middle of it): %r",
            path,
            len(lines) + 1,
            len(tail),
            tail[:80],
        )
        if repair:
            os.truncate(path, len(data) - len(tail))
        return records
    if repair:
        with open(path, "ab") as f:
            f.write(b"\n")
    return records


def _parse(path: Path, number: int, line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError as e:
        raise ValueError(f"{path}:{number}: not a JSON line ({e}): {line[:80]!r}") from e
