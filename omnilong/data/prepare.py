"""Tokenize a corpus once, in parallel, into a prepared directory (:mod:`omnilong.data.prepared`).

The main process reads the source files in order and hands batches of documents to a
pool of worker processes (each loads the tokenizer once); results are written in the
original order as they come back, with at most a few batches in flight, so memory stays
bounded whatever the corpus size. ``tools/prepare_data.py`` is the command line.
"""

import errno
import multiprocessing
import os
import shlex
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from omnilong.data.chat import _validate_messages, chat_content_form, tokenize_conversation
from omnilong.data.llava_video import LlavaVideoFormat
from omnilong.data.packed_text import separator_id, tokenize_documents
from omnilong.data.prepared import (
    KINDS,
    META,
    PREPARED_NAMES,
    PreparedDataError,
    PreparedWriter,
    inside,
    read_prepared,
    source_fingerprint,
    tokenizer_fingerprint,
)
from omnilong.data.sources import PathLike, expand_data_files, read_records, read_text_documents
from omnilong.data.tokenizer import load_tokenizer
from omnilong.data.video import probe_video
from omnilong.data.video_sft import QwenVideoFormat, parse_sample, tokenize_video_sample

_TEXT_BATCH_CHARS = 1 << 20  # a text batch: about 1M characters
_SAMPLE_BATCH = 64  # a chat / video batch: samples
_worker_tokenizer = None
#: video_sft: how each family writes a video in the text, ``(marker, pad token)``.
VIDEO_FORMATS = {f.model_type: (f.marker, f.pad_token) for f in (QwenVideoFormat, LlavaVideoFormat)}


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _text_batch(texts: list[str], separator: int) -> tuple[np.ndarray, np.ndarray]:
    return tokenize_documents(_worker_tokenizer, texts, separator)


def _sample_batch(
    kind: str, samples: list[tuple[str, Any, str | None]], skip_bad: bool, video_format: str = "qwen2_5_vl"
) -> list:
    """``(tokens, trainable, record)`` per sample, or ``None`` for a bad one when skipping.
    A video_sft sample is bad if a video lies outside its data directory ``root`` or is
    missing, empty, corrupt or without a video stream (probed: headers and frame index)."""
    out = []
    for origin, record, root in samples:
        try:
            if kind == "chat":
                input_ids, trainable = tokenize_conversation(_worker_tokenizer, _validate_messages(origin, record))
                meta = {"origin": origin}
            else:
                marker, pad_token = VIDEO_FORMATS[video_format]
                sample = parse_sample(origin, record, Path(root), marker)
                videos = [os.path.normpath(v) for v in sample.videos]
                for video in videos:
                    if not inside(video, [root]):
                        raise ValueError(
                            f"{origin}: video {video} lies outside the data directory {root} "
                            "(give --data-root a directory that holds every video)"
                        )
                    try:
                        probe_video(video)
                    except (FileNotFoundError, ValueError) as e:  # ValueError: VideoDecodeError
                        raise type(e)(f"{origin}: {e}") from e
                input_ids, trainable = tokenize_video_sample(_worker_tokenizer, sample, pad_token)
                meta = {"origin": origin, "videos": videos, "messages": sample.messages}
        except (ValueError, FileNotFoundError):
            if not skip_bad:
                raise
            out.append(None)
            continue
        out.append((input_ids.numpy().astype(np.uint32), trainable.numpy().astype(np.uint8), meta))
    return out


def _text_batches(files: Sequence[Path], text_column: str, counts: dict[str, int], on_bad) -> Iterator[list[str]]:
    batch, chars = [], 0
    for _, text in read_text_documents(files, text_column, on_bad):
        if not text.strip():
            counts["empty_documents"] += 1
            continue
        batch.append(text)
        chars += len(text)
        if chars >= _TEXT_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _sample_batches(files: Sequence[Path], data_root: PathLike | None, on_bad) -> Iterator[list]:
    batch = []
    for path in files:
        root = str((Path(data_root).expanduser() if data_root is not None else path.parent).resolve())
        for origin, record in read_records(path, on_bad):
            batch.append((origin, record, root))
            if len(batch) == _SAMPLE_BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def _check_output(output: Path, files: Sequence[Path]) -> None:
    """Refuse an ``output`` that preparing would wrongly replace: one that holds a source
    file, or anything but an absent path, an empty directory or a prepared directory
    (``meta.json`` and nothing but the files of prepared data).

    Raises:
        ValueError: names the source or the foreign files and the fix.
    """
    resolved = output.resolve()
    source = next((f for f in files if f.resolve().is_relative_to(resolved)), None)
    if source is not None:
        raise ValueError(
            f"--output {output} holds the source {source}, which preparing would delete; choose another --output"
        )
    if not output.exists():
        return
    if not output.is_dir():
        raise ValueError(f"--output {output} exists and is not a directory; choose another --output")
    names = {p.name for p in output.iterdir()}
    if names and (META not in names or names - PREPARED_NAMES):
        others = sorted(names - PREPARED_NAMES)
        listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise ValueError(
            f"--output {output} is not a prepared data directory (it holds {listed}{'' if META in names else ', no ' + META}), "
            "and preparing replaces its output whole; choose another --output, or empty it"
        )


def _ordered_map(pool, fn, batches: Iterator[tuple], in_flight: int) -> Iterator:
    """``fn(*args)`` for each args of ``batches``, in order, at most ``in_flight`` pending
    (``pool`` None: in this process)."""
    if pool is None:
        yield from (fn(*args) for args in batches)
        return
    pending: deque = deque()
    for args in batches:
        pending.append(pool.apply_async(fn, args))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def prepare(
    kind: str,
    data_files: PathLike | Sequence[PathLike],
    tokenizer_dir: PathLike,
    output: PathLike,
    workers: int = 1,
    text_column: str = "text",
    separator_token: str | None = None,
    data_root: PathLike | None = None,
    skip_bad_samples: bool = False,
    force: bool = False,
    progress: bool = True,
    video_format: str = "qwen2_5_vl",
) -> dict[str, Any]:
    """Tokenize ``data_files`` into the prepared directory ``output``.

    Args:
        kind: ``text`` (stage 1: documents, ``separator_token`` after each), ``chat`` (stage 2:
            conversations and their assistant-turn mask) or ``video_sft`` (stage 3: validated
            samples with resolved video paths and their tokenized text; videos are decoded in
            training).
        data_files: files, directories or globs, as for the raw datasets.
        tokenizer_dir: the model (or tokenizer) directory training will use.
        output: the directory to write (replaced atomically once complete): absent, empty
            or a prepared directory, and holding no source file.
        workers: tokenizer processes (1: in this process).
        text_column, separator_token: text kind, as :class:`~omnilong.data.PackedTextDataset`.
        data_root: video_sft kind, as :func:`~omnilong.data.video_sft_dataset`.
        skip_bad_samples: skip and count malformed JSONL lines and records, and (chat /
            video_sft) malformed samples, samples with a video that is missing, unreadable or
            outside the data directory, or a rendering without their video tokens, instead of
            raising.
        force: prepare again even if ``output`` already holds this very preparation.
        progress: show a tqdm bar.
        video_format: video_sft kind: the model family whose video placeholders the text gets
            (:data:`VIDEO_FORMATS`; ``llava_onevision`` for ``llava_video_sft_dataset``).

    Returns:
        The ``meta.json`` contents (counts, skipped, seconds, tokens per second, ...).

    Raises:
        ValueError: an unknown kind, no document, a bad sample (named) unless skipped, an
            ``output`` that is not a prepared directory or holds a source.
        OSError: "no space left on <dir>" (ENOSPC) once the temporary directory is removed.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"video_format must be one of {sorted(VIDEO_FORMATS)}, got {video_format!r}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    files = expand_data_files(data_files)
    tokenizer = load_tokenizer(tokenizer_dir)
    if kind != "text":
        chat_content_form(tokenizer)  # a template that renders no text is refused, never skipped sample by sample
    settings: dict[str, Any] = {}
    if kind == "text":
        settings = {"separator_id": separator_id(tokenizer, separator_token), "text_column": text_column}
    elif kind == "video_sft":
        settings = {"data_root": None if data_root is None else str(Path(data_root).expanduser().resolve())}
        if video_format != "qwen2_5_vl":  # Qwen2.5-VL's directories predate the setting
            settings["video_format"] = video_format
    identity = {
        "settings": settings,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "sources": source_fingerprint(files),
    }
    output = Path(output).expanduser()
    _check_output(output, files)
    if not force and (output / META).is_file():
        try:
            meta = read_prepared(output)  # a truncated or damaged directory is prepared again
        except PreparedDataError:
            meta = {}
        if meta.get("kind") == kind and all(meta.get(k) == v for k, v in identity.items()):
            return {**meta, "up_to_date": True}

    command = [
        "python",
        "tools/prepare_data.py",
        "--kind",
        kind,
        "--tokenizer",
        str(tokenizer_dir),
        "--output",
        str(output),
        "--workers",
        str(workers),
    ]
    if kind == "text":
        command += ["--text-column", text_column] + (["--separator-token", separator_token] if separator_token else [])
    if data_root is not None:
        command += ["--data-root", str(data_root)]
    command += ["--skip-bad-samples"] * skip_bad_samples
    command += ["--video-format", video_format] * ("video_format" in settings)
    command += [str(f) for f in ([data_files] if isinstance(data_files, (str, Path)) else data_files)]

    counts = {"empty_documents": 0, "bad_samples": 0}

    def count_bad(error: ValueError) -> None:  # a malformed line or record, skipped
        counts["bad_samples"] += 1

    on_bad = count_bad if skip_bad_samples else None
    writer = PreparedWriter(output, kind)
    start = time.perf_counter()
    if workers > 1:  # fork: the workers start at once; each loads the tokenizer once
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
        pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (str(tokenizer_dir),))
    else:
        pool = None
        global _worker_tokenizer
        _worker_tokenizer = tokenizer
    bar = tqdm(
        desc=f"prepare {kind}",
        unit=" docs",
        disable=None if progress else True,  # None: terminal only
        dynamic_ncols=True,
    )
    try:
        if kind == "text":
            batches = ((texts, settings["separator_id"]) for texts in _text_batches(files, text_column, counts, on_bad))
            for tokens, lengths in _ordered_map(pool, _text_batch, batches, 2 * workers):
                writer.add_stream(tokens, lengths)
                bar.update(len(lengths))
                bar.set_postfix(tokens=f"{writer.num_tokens:,}", refresh=False)
        else:
            batches = (
                (kind, batch, skip_bad_samples, video_format) for batch in _sample_batches(files, data_root, on_bad)
            )
            for results in _ordered_map(pool, _sample_batch, batches, 2 * workers):
                for result in results:
                    if result is None:
                        counts["bad_samples"] += 1
                    else:
                        writer.add(*result)
                bar.update(len(results))
                bar.set_postfix(tokens=f"{writer.num_tokens:,}", refresh=False)
        if writer.num_documents == 0:
            raise ValueError(f"no usable document in {[str(f) for f in files][:5]} (skipped: {counts})")
        seconds = time.perf_counter() - start
        writer.commit(
            {
                **identity,
                "tokenizer_dir": str(tokenizer_dir),
                "num_skipped": counts,
                "workers": workers,
                "prepare_seconds": round(seconds, 3),
                "command": shlex.join(command),
            }
        )
        return {**read_prepared(output), "up_to_date": False}
    except BaseException as e:
        writer.abort()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"no space left on {writer.tmp.parent} while preparing {output}: removed {writer.tmp.name}, "
                f"the previous prepared data (if any) is kept; free space or choose another --output",
            ) from e
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
