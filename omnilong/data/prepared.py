"""The on-disk format of prepared (tokenized once) data, and opening it lazily.

A prepared source is a directory written by ``tools/prepare_data.py``::

    meta.json      format version, kind (text | chat | video_sft), settings, tokenizer
                   fingerprint, source files (path, size, mtime), counts, the command
    tokens.u32     every token id, flat, uint32, little-endian          [num_tokens]
    offsets.i64    document d holds tokens[offsets[d]:offsets[d + 1]]   [num_documents + 1]
    trainable.u8   chat / video_sft: 1 where the token is in an assistant turn   [num_tokens]
    records.jsonl  chat / video_sft: one JSON line per document (origin; videos, messages)
    records.i64    byte offset of each line of records.jsonl            [num_documents + 1]

The arrays are ``np.memmap``: opening reads ``meta.json`` only, and a row touches just
the pages of its slice, so start-up time and resident memory do not grow with the corpus.
A directory is complete or absent: it is written under a temporary name and renamed
(``meta.json`` last), so a killed prepare never leaves a cache that looks valid.
"""

import hashlib
import json
import mmap
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
KINDS = ("text", "chat", "video_sft")
META = "meta.json"


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
    """A prepared directory that is missing, incomplete, or made for another tokenizer,
    kind or settings; the message gives the command that (re)prepares it."""


@dataclass
class PreparedSource:
    """An opened prepared directory; arrays are read-only memory maps.

    Attributes:
        path: the directory.
        meta: the parsed ``meta.json``.
        tokens: ``[num_tokens]`` uint32 token ids.
        offsets: ``[num_documents + 1]`` int64 document boundaries into ``tokens``.
        trainable: ``[num_tokens]`` uint8 assistant-turn mask (chat / video_sft), else None.
    """

    path: Path
    meta: dict[str, Any]
    tokens: np.ndarray
    offsets: np.ndarray
    trainable: np.ndarray | None

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def record(self, index: int) -> dict[str, Any]:
        """The JSON record of document ``index`` (read from disk on each call)."""
        bounds = _memmap(self.path / "records.i64", "<i8")
        with open(self.path / "records.jsonl", "rb") as f:
            f.seek(int(bounds[index]))
            return json.loads(f.read(int(bounds[index + 1] - bounds[index])))


class MappedArray(np.memmap):
    """A read-only memory map of a whole file that pickles as its path and dtype, so a
    DataLoader worker started by spawn or forkserver reopens the file instead of being
    sent a copy of it (a view pickles as a copy of its data, as any array)."""

    def __reduce__(self):
        if not isinstance(self.base, mmap.mmap):
            return super().__reduce__()
        return _memmap, (Path(self.filename), self.dtype.str)


def _memmap(path: Path, dtype: str) -> np.ndarray:
    if path.stat().st_size == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return MappedArray(path, dtype=dtype, mode="r")


def open_prepared(path: str | Path, kind: str, tokenizer, settings: Mapping[str, Any]) -> PreparedSource:
    """Open a prepared directory after checking it was made with ``tokenizer``, for ``kind``
    and with ``settings``.

    Raises:
        PreparedDataError: missing or incomplete directory, another format version, kind,
            settings or tokenizer; the message names the difference and the prepare command.
    """
    path = Path(path).expanduser()
    meta_path = path / META
    if not meta_path.is_file():
        raise PreparedDataError(
            f"{path} is not a prepared data directory (no {META}); create it with "
            f"`python tools/prepare_data.py --kind {kind} --tokenizer <model dir> --output {path} <data files>`"
        )
    meta = json.loads(meta_path.read_text())
    command = meta.get("command", "python tools/prepare_data.py ...")
    rerun = f"rerun `{command if len(command) <= 300 else command[:300] + ' ...'}` (in full: {meta_path}, 'command')"
    if meta.get("format_version") != FORMAT_VERSION:
        raise PreparedDataError(
            f"{path}: prepared with format version {meta.get('format_version')}, this "
            f"OmniLong reads version {FORMAT_VERSION}; {rerun}"
        )
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
            f"{fingerprint[:12]}): its token ids would be wrong; {rerun} with --tokenizer {tokenizer.name_or_path}"
        )
    differ = {k: (meta["settings"].get(k), v) for k, v in settings.items() if meta["settings"].get(k) != v}
    if differ:
        diffs = ", ".join(f"{k}: prepared {old!r}, wanted {new!r}" for k, (old, new) in differ.items())
        raise PreparedDataError(f"{path}: prepared with other settings ({diffs}); {rerun} with the new settings")
    trainable = _memmap(path / "trainable.u8", "u1") if kind != "text" else None
    return PreparedSource(
        path, meta, _memmap(path / "tokens.u32", "<u4"), _memmap(path / "offsets.i64", "<i8"), trainable
    )


class PreparedWriter:
    """Writes a prepared directory: documents are appended in order, :meth:`commit` writes
    ``meta.json`` and renames the temporary directory into place (an existing one is
    replaced only then). Memory use is constant: arrays are appended to files.

    Args:
        output: the directory to create.
        kind: ``text``, ``chat`` or ``video_sft``.
    """

    def __init__(self, output: str | Path, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.output, self.kind = Path(output), kind
        self.tmp = self.output.with_name(f"{self.output.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self._tokens = open(self.tmp / "tokens.u32", "wb")
        self._offsets = open(self.tmp / "offsets.i64", "wb")
        self._offsets.write(np.zeros(1, "<i8").tobytes())
        self._trainable = open(self.tmp / "trainable.u8", "wb") if kind != "text" else None
        self._records = open(self.tmp / "records.jsonl", "wb") if kind != "text" else None
        self._record_offsets = open(self.tmp / "records.i64", "wb") if kind != "text" else None
        if self._record_offsets is not None:
            self._record_offsets.write(np.zeros(1, "<i8").tobytes())
        self.num_tokens = self.num_documents = self._record_bytes = 0

    def add(
        self, tokens: np.ndarray, trainable: np.ndarray | None = None, record: dict[str, Any] | None = None
    ) -> None:
        """Append one document: ``tokens [n]``; for chat / video_sft its ``trainable [n]`` mask
        and JSON ``record``."""
        self._tokens.write(np.asarray(tokens, dtype="<u4").tobytes())
        self.num_tokens += len(tokens)
        self.num_documents += 1
        self._offsets.write(np.array([self.num_tokens], "<i8").tobytes())
        if self._trainable is not None:
            self._trainable.write(np.asarray(trainable, dtype="u1").tobytes())
            line = (json.dumps(record) + "\n").encode()
            self._records.write(line)
            self._record_bytes += len(line)
            self._record_offsets.write(np.array([self._record_bytes], "<i8").tobytes())

    def add_stream(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many text documents at once: ``tokens [sum(lengths)]`` split by ``lengths [D]``."""
        self._tokens.write(np.asarray(tokens, dtype="<u4").tobytes())
        self._offsets.write((self.num_tokens + np.cumsum(lengths, dtype="<i8")).astype("<i8").tobytes())
        self.num_tokens += int(np.sum(lengths))
        self.num_documents += len(lengths)

    def commit(self, meta: dict[str, Any]) -> Path:
        """Write ``meta.json`` (with the format version, kind and counts) and move into place."""
        for f in (self._tokens, self._offsets, self._trainable, self._records, self._record_offsets):
            if f is not None:
                f.close()
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            **meta,
        }
        (self.tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        old = self.output.with_name(f"{self.output.name}.old-{os.getpid()}")
        if self.output.exists():
            self.output.rename(old)
        self.tmp.rename(self.output)
        shutil.rmtree(old, ignore_errors=True)
        return self.output

    def abort(self) -> None:
        """Remove the temporary directory (nothing is left that looks prepared)."""
        for f in (self._tokens, self._offsets, self._trainable, self._records, self._record_offsets):
            if f is not None:
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
