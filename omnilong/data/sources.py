"""Reading raw samples from local files: plain text, JSONL, JSON and parquet.

Errors name the file (and the line, for JSONL) and say what was expected.
"""

import glob
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

PathLike = str | Path


def expand_data_files(data_files: PathLike | Sequence[PathLike]) -> list[Path]:
    """Paths, directories (searched recursively) and glob patterns -> a sorted file list.

    Raises:
        FileNotFoundError: a path or pattern matches no file.
    """
    if isinstance(data_files, (str, Path)):
        data_files = [data_files]
    files: list[Path] = []
    for entry in data_files:
        path = Path(entry).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"data file or pattern {str(entry)!r} matches no file")
        files.extend(matches)
    return files


def read_records(path: Path, on_bad: Callable[[ValueError], None] | None = None) -> Iterator[tuple[str, Any]]:
    """``(origin, record)`` pairs of a JSONL, JSON (list of objects) or parquet file.

    ``origin`` is ``"file:line"`` for JSONL and ``"file[index]"`` otherwise. ``on_bad``: called
    with the error of a malformed JSONL line, which is then skipped, instead of raising it.

    Raises:
        ValueError: a malformed JSONL line (file and line number in the message), or a
            JSON file that is not a list.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{line_no}", json.loads(line)
                except json.JSONDecodeError as e:
                    error = ValueError(f"{path}:{line_no}: malformed JSON line ({e.msg} at column {e.colno})")
                    if on_bad is None:
                        raise error from e
                    on_bad(error)
    elif suffix == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")
        for i, record in enumerate(records):
            yield f"{path}[{i}]", record
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}[{i}]", record
    else:
        raise ValueError(f"{path}: unsupported sample file type {suffix!r} (use .jsonl, .json or .parquet)")


def read_text_documents(
    files: Sequence[Path], text_column: str = "text", on_bad: Callable[[ValueError], None] | None = None
) -> Iterator[tuple[str, str]]:
    """``(origin, text)`` of every document: a whole file for plain-text files, the
    ``text_column`` field of each record for JSONL/JSON/parquet. ``on_bad``: called with the
    error of a malformed JSONL line or record, which is then skipped, instead of raising it.

    Raises:
        ValueError: a record without a string ``text_column`` (names file and line).
    """
    for path in files:
        if path.suffix.lower() in (".jsonl", ".json", ".parquet"):
            for origin, record in read_records(path, on_bad):
                text = record.get(text_column) if isinstance(record, dict) else None
                if isinstance(text, str):
                    yield origin, text
                    continue
                error = ValueError(f"{origin}: expected an object with a string field {text_column!r}")
                if on_bad is None:
                    raise error
                on_bad(error)
        else:
            try:
                yield str(path), path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
