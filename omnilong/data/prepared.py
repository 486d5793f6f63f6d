"""The on-disk format of prepared (tokenized once) data, and opening it lazily.

A prepared source is a directory written by ``tools/prepare_data.py``::

    meta.json      format version, kind (text | chat | video_sft), settings, tokenizer
                   fingerprint, source files (path, size, mtime), counts, the command,
                   the sha256 of each file below
    tokens.u32     every token id, flat, uint32, little-endian          [num_tokens]
    offsets.i64    document d holds tokens[offsets[d]:offsets[d + 1]]   [num_documents + 1]
    trainable.u8   chat / video_sft: 1 where the token is in an assistant turn   [num_tokens]
    records.i64    chat / video_sft: byte offset of each line of records.jsonl   [num_documents + 1]
    records.jsonl  chat / video_sft: one JSON line per document (origin; videos, messages)

The files are ``np.memmap``: opening reads ``meta.json`` and checks each file's size against
it (a truncated file is refused), and a row touches just the pages of its slice, so start-up
time and resident memory do not grow with the corpus. Every file is opened once, through one
handle on the directory: a run reads the version it opened to the end, even if the directory
is prepared again meanwhile. A directory is complete or absent: it is written under a
temporary name and renamed into place, so a killed prepare never leaves a cache that looks
valid. :func:`verify_prepared` checks the contents against the recorded checksums.
"""

import functools
import hashlib
import json
import mmap
import os
import shutil
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

FORMAT_VERSION = 1
KINDS = ("text", "chat", "video_sft")
META = "meta.json"
#: the data files of each kind and their dtypes, in the order their sizes are checked.
DATA_FILES = {
    "text": {"tokens.u32": "<u4", "offsets.i64": "<i8"},
    "chat": {
        "tokens.u32": "<u4",
        "offsets.i64": "<i8",
        "trainable.u8": "u1",
        "records.i64": "<i8",
        "records.jsonl": "u1",
    },
}
DATA_FILES["video_sft"] = DATA_FILES["chat"]
#: every name a prepared directory holds.
PREPARED_NAMES = frozenset({META, *DATA_FILES["chat"]})


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides token ids: the fast tokenizer's full definition
    (vocabulary, merges, normalizer, pre-tokenizer, added and special tokens) and the
    chat template (it renders chat and video samples before tokenization)."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True).encode())
    return digest.hexdigest()


def source_fingerprint(files: Sequence[Path]) -> list[dict[str, Any]]:
    """``[{path, size, mtime_ns}]`` of the source files (provenance in ``meta.json``; a rerun of
    the same prepare with unchanged sources, tokenizer and settings is a no-op)."""
    return [{"path": str(f.resolve()), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]


class PreparedDataError(ValueError):
    """A prepared directory that is missing, incomplete, damaged, or made for another
    tokenizer, kind or settings; the message names the file and the command that
    (re)prepares it."""


def _not_prepared(path: Path, kind: str = "<kind>") -> PreparedDataError:
    return PreparedDataError(
        f"{path} is not a prepared data directory (no {META}); create it with "
        f"`python tools/prepare_data.py --kind {kind} --tokenizer <model dir> --output {path} <data files>`"
    )


def _rerun(path: Path, meta: Mapping[str, Any]) -> str:
    """The fix for a bad prepared directory: the command that made it, with ``--force``."""
    command = meta.get("command", "python tools/prepare_data.py ...")
    shown = command if len(command) <= 300 else command[:300] + " ..."
    return f"rerun `{shown}` (in full: {path / META}, 'command') with --force"


_META_FIELDS = {"kind": str, "num_tokens": int, "num_documents": int, "settings": dict, "tokenizer_fingerprint": str}


def _parse_meta(path: Path, raw: bytes) -> dict[str, Any]:
    """The ``meta.json`` of the directory ``path``.

    Raises:
        PreparedDataError: not JSON, or a field of this format version missing or mistyped;
            another format version (with the command that made it).
    """
    fix = (
        f"prepare the directory again: `python tools/prepare_data.py --force --kind <kind> --tokenizer <model dir> "
        f"--output {path} <data files>`"
    )
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PreparedDataError(f"{path / META} is damaged (not JSON: {e}); {fix}") from None
    if not isinstance(meta, dict):
        raise PreparedDataError(f"{path / META} is damaged (a JSON {type(meta).__name__}, not an object); {fix}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PreparedDataError(
            f"{path}: prepared with format version {meta.get('format_version')}, this "
            f"OmniLong reads version {FORMAT_VERSION}; {_rerun(path, meta)}"
        )
    bad = [k for k, t in _META_FIELDS.items() if not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool)]
    if bad or meta["kind"] not in KINDS or min(meta["num_tokens"], meta["num_documents"]) < 0:
        raise PreparedDataError(
            f"{path / META} is damaged (bad or missing {', '.join(bad) or 'kind or counts'}); {fix}"
        )
    return meta


def _check_sizes(path: Path, meta: Mapping[str, Any], files: Mapping[str, BinaryIO]) -> None:
    """Each data file's size is the one ``meta.json``'s counts give (``records.jsonl``: where
    ``records.i64``'s last offset points).

    Raises:
        PreparedDataError: a truncated or overlong file, named with both sizes.
    """
    tokens, documents = meta["num_tokens"], meta["num_documents"]
    expected = {"tokens.u32": 4 * tokens, "offsets.i64": 8 * (documents + 1), "trainable.u8": tokens}
    expected["records.i64"] = 8 * (documents + 1)
    for name, f in files.items():
        size = os.fstat(f.fileno()).st_size
        if name == "records.jsonl":
            expected[name] = int(np.frombuffer(os.pread(files["records.i64"].fileno(), 8, 8 * documents), "<i8")[0])
        if size != expected[name]:
            raise PreparedDataError(
                f"{path / name} has {size:,} bytes, {META} ({meta['num_documents']:,} documents, "
                f"{meta['num_tokens']:,} tokens) says {expected[name]:,}: truncated or damaged; {_rerun(path, meta)}"
            )


def _open_files(path: Path, kind: str = "<kind>") -> tuple[dict[str, Any], dict[str, BinaryIO]]:
    """``(meta, {name: open file})`` of the prepared directory ``path``, sizes checked. All
    are opened through one handle on the directory, so they are of one version even if the
    directory is replaced meanwhile. The caller closes the files.

    Raises:
        PreparedDataError: not a prepared directory, a damaged ``meta.json``, a missing or
            truncated file.
    """
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        raise _not_prepared(path, kind) from None
    files: dict[str, BinaryIO] = {}
    try:
        opener = functools.partial(os.open, dir_fd=dir_fd)
        try:
            with open(META, "rb", opener=opener) as f:
                meta = _parse_meta(path, f.read())
        except FileNotFoundError:
            raise _not_prepared(path, kind) from None
        for name in DATA_FILES[meta["kind"]]:
            try:
                files[name] = open(name, "rb", opener=opener)
            except FileNotFoundError:
                raise PreparedDataError(f"{path / name} is missing; {_rerun(path, meta)}") from None
        _check_sizes(path, meta, files)
    except BaseException:
        for f in files.values():
            f.close()
        raise
    finally:
        os.close(dir_fd)
    return meta, files


def read_prepared(path: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a prepared directory whose files all have the sizes it gives.

    Raises:
        PreparedDataError: as :func:`open_prepared`, before the kind and tokenizer checks.
    """
    meta, files = _open_files(Path(path).expanduser())
    for f in files.values():
        f.close()
    return meta


def verify_prepared(path: str | Path) -> dict[str, Any]:
    """Check every file of a prepared directory against the sha256 recorded in its
    ``meta.json`` (reads it all), and return the ``meta.json``.

    Raises:
        PreparedDataError: a file whose contents differ (named); a directory prepared before
            checksums were recorded (its sizes match: it stays readable, but cannot be verified).
    """
    path = Path(path).expanduser()
    meta, files = _open_files(path)
    try:
        if not isinstance(meta.get("sha256"), dict):
            raise PreparedDataError(
                f"{path} was prepared before checksums were recorded: its file sizes match {META} and training "
                f"reads it, but its contents cannot be verified; {_rerun(path, meta)} to record them"
            )
        damaged = [name for name, f in files.items() if _sha256(f) != meta["sha256"].get(name)]
    finally:
        for f in files.values():
            f.close()
    if damaged:
        raise PreparedDataError(
            f"{', '.join(str(path / n) for n in damaged)}: contents differ from the checksums in {META} "
            f"(damaged); {_rerun(path, meta)}"
        )
    return meta


def _sha256(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := f.read(1 << 24):
        digest.update(chunk)
    return digest.hexdigest()


def video_roots(meta: Mapping[str, Any]) -> list[str]:
    """The directories a ``video_sft`` directory's videos must lie in: its ``data_root``, or
    else the directories of its source files (where relative video paths were resolved)."""
    root = meta["settings"].get("data_root")
    if root is not None:
        return [os.path.abspath(root)]
    return sorted({os.path.dirname(os.path.abspath(s["path"])) for s in meta.get("sources", [])})


def inside(path: str | Path, roots: Sequence[str]) -> bool:
    """Whether ``path`` (made absolute and normalised, ``..`` removed) lies in one of ``roots``."""
    path = os.path.abspath(path)
    return any(os.path.commonpath([path, root]) == root for root in roots)


@dataclass
class PreparedSource:
    """An opened prepared directory; arrays are read-only memory maps of the version opened.

    Attributes:
        path: the directory.
        meta: the parsed ``meta.json``.
        tokens: ``[num_tokens]`` uint32 token ids.
        offsets: ``[num_documents + 1]`` int64 document boundaries into ``tokens``.
        trainable: ``[num_tokens]`` uint8 assistant-turn mask (chat / video_sft), else None.
        records: ``[bytes]`` uint8 ``records.jsonl`` (chat / video_sft), else None.
        record_offsets: ``[num_documents + 1]`` int64 line boundaries into ``records``, else None.
    """

    path: Path
    meta: dict[str, Any]
    tokens: np.ndarray
    offsets: np.ndarray
    trainable: np.ndarray | None
    records: np.ndarray | None = None
    record_offsets: np.ndarray | None = None

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @functools.cached_property
    def video_roots(self) -> list[str]:
        return video_roots(self.meta)

    def record(self, index: int) -> dict[str, Any]:
        """The JSON record of document ``index``.

        Raises:
            PreparedDataError: a video_sft record naming a video outside the directory's data
                root (see :func:`video_roots`).
        """
        lo, hi = int(self.record_offsets[index]), int(self.record_offsets[index + 1])
        record = json.loads(self.records[lo:hi].tobytes())
        if self.meta["kind"] == "video_sft":
            outside = next((v for v in record["videos"] if not inside(v, self.video_roots)), None)
            if outside is not None:
                raise PreparedDataError(
                    f"{self.path / 'records.jsonl'}: record {index} ({record['origin']}) names a video outside "
                    f"its data directory {', '.join(self.video_roots)}: {outside}; {_rerun(self.path, self.meta)}"
                )
        return record


class MappedArray(np.memmap):
    """A read-only memory map of a whole file that pickles as its path, dtype and the file's
    identity (device, inode), so a DataLoader worker started by spawn or forkserver reopens
    the file instead of being sent a copy of it (a view pickles as a copy of its data, as any
    array), and refuses a file replaced since (the directory prepared again) rather than
    read another version of it."""

    def __reduce__(self):
        if not isinstance(self.base, mmap.mmap):
            return super().__reduce__()
        return _reopen, (self.filename, self.dtype.str, self.identity)


def _memmap(path: Path, f: BinaryIO, dtype: str) -> np.ndarray:
    """A read-only map of the open file ``f`` (whose path is ``path``)."""
    stat = os.fstat(f.fileno())
    if stat.st_size == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=dtype)
    array = MappedArray(f, dtype=dtype, mode="r")
    array.filename, array.identity = str(path), (stat.st_dev, stat.st_ino)
    return array


def _reopen(path: str, dtype: str, identity: tuple[int, int]) -> np.ndarray:
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        if (stat.st_dev, stat.st_ino) != tuple(identity):
            raise PreparedDataError(
                f"{path} was replaced (prepared again) after this run opened it; restart the run to read the new version"
            )
        return _memmap(Path(path), f, dtype)


def open_prepared(path: str | Path, kind: str, tokenizer, settings: Mapping[str, Any]) -> PreparedSource:
    """Open a prepared directory after checking it was made with ``tokenizer``, for ``kind``
    and with ``settings``, and that its files have the sizes ``meta.json`` gives.

    Raises:
        PreparedDataError: missing, incomplete or truncated directory, a damaged
            ``meta.json``, another format version, kind, settings or tokenizer; the message
            names the file or the difference, and the prepare command.
    """
    path = Path(path).expanduser()
    meta, files = _open_files(path, kind)
    try:
        rerun = _rerun(path, meta)
        if meta["kind"] != kind:
            raise PreparedDataError(
                f"{path}: holds {meta['kind']!r} data, the dataset expects {kind!r}; prepare it "
                f"with --kind {kind} or use the {meta['kind']} dataset component"
            )
        fingerprint = tokenizer_fingerprint(tokenizer)
        if meta["tokenizer_fingerprint"] != fingerprint:
            raise PreparedDataError(
                f"{path}: tokenized with another tokenizer (prepared from {meta.get('tokenizer_dir')!r}, fingerprint "
                f"{meta['tokenizer_fingerprint'][:12]}; this run's tokenizer {tokenizer.name_or_path!r} has "
                f"{fingerprint[:12]}): its token ids would be wrong; {rerun} and --tokenizer {tokenizer.name_or_path}"
            )
        differ = {k: (meta["settings"].get(k), v) for k, v in settings.items() if meta["settings"].get(k) != v}
        if differ:
            diffs = ", ".join(f"{k}: prepared {old!r}, wanted {new!r}" for k, (old, new) in differ.items())
            raise PreparedDataError(f"{path}: prepared with other settings ({diffs}); {rerun} and the new settings")
        arrays = {name: _memmap(path / name, f, DATA_FILES[kind][name]) for name, f in files.items()}
    finally:
        for f in files.values():
            f.close()
    return PreparedSource(
        path,
        meta,
        arrays["tokens.u32"],
        arrays["offsets.i64"],
        arrays.get("trainable.u8"),
        arrays.get("records.jsonl"),
        arrays.get("records.i64"),
    )


class PreparedWriter:
    """Writes a prepared directory: documents are appended in order, :meth:`commit` writes
    ``meta.json`` (with each file's sha256, computed as it is written) and renames the
    temporary directory into place (an existing one is replaced only then). Memory use is
    constant: arrays are appended to files.

    Args:
        output: the directory to create.
        kind: ``text``, ``chat`` or ``video_sft``.
    """

    def __init__(self, output: str | Path, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.output, self.kind = Path(output), kind
        self.tmp = self.output.with_name(f"{self.output.name}.tmp-{os.getpid()}")
        self._files: dict[str, tuple[BinaryIO, Any]] = {}
        shutil.rmtree(self.tmp, ignore_errors=True)
        try:
            self.tmp.mkdir(parents=True)
            for name in DATA_FILES[kind]:
                self._files[name] = (open(self.tmp / name, "wb"), hashlib.sha256())
            self._write("offsets.i64", np.zeros(1, "<i8"))
            if kind != "text":
                self._write("records.i64", np.zeros(1, "<i8"))
        except BaseException:
            self.abort()
            raise
        self.num_tokens = self.num_documents = self._record_bytes = 0

    def _write(self, name: str, data: np.ndarray | bytes) -> None:
        data = data if isinstance(data, bytes) else data.tobytes()
        f, digest = self._files[name]
        f.write(data)
        digest.update(data)

    def add(
        self, tokens: np.ndarray, trainable: np.ndarray | None = None, record: dict[str, Any] | None = None
    ) -> None:
        """Append one document: ``tokens [n]``; for chat / video_sft its ``trainable [n]`` mask
        and JSON ``record``."""
        self._write("tokens.u32", np.asarray(tokens, dtype="<u4"))
        self.num_tokens += len(tokens)
        self.num_documents += 1
        self._write("offsets.i64", np.array([self.num_tokens], "<i8"))
        if self.kind != "text":
            self._write("trainable.u8", np.asarray(trainable, dtype="u1"))
            line = (json.dumps(record) + "\n").encode()
            self._write("records.jsonl", line)
            self._record_bytes += len(line)
            self._write("records.i64", np.array([self._record_bytes], "<i8"))

    def add_stream(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many text documents at once: ``tokens [sum(lengths)]`` split by ``lengths [D]``."""
        self._write("tokens.u32", np.asarray(tokens, dtype="<u4"))
        self._write("offsets.i64", (self.num_tokens + np.cumsum(lengths, dtype="<i8")).astype("<i8"))
        self.num_tokens += int(np.sum(lengths))
        self.num_documents += len(lengths)

    def commit(self, meta: dict[str, Any]) -> Path:
        """Write ``meta.json`` (with the format version, kind, counts and checksums) and move
        into place: the previous directory, if any, is renamed aside and removed (a run that
        has it open keeps reading its files)."""
        for f, _ in self._files.values():
            f.close()
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            **meta,
            "sha256": {name: digest.hexdigest() for name, (_, digest) in self._files.items()},
        }
        (self.tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        old = self.output.with_name(f"{self.output.name}.old-{os.getpid()}")
        if self.output.exists():
            self.output.rename(old)
        try:
            self.tmp.rename(self.output)
        except BaseException:
            if old.exists():
                old.rename(self.output)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return self.output

    def abort(self) -> None:
        """Remove the temporary directory (nothing is left that looks prepared)."""
        for f, _ in self._files.values():
            with suppress(OSError):  # a full disk fails the last flush; the file is closed all the same
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
