"""The demo's datasets: this Python's standard-library sources as text (stage 1) and their
docstrings as chat (stage 2). Real text present on every machine, so the tiny configs, the
demo and the tests need no download."""

import ast
import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omnilong.data.chat import ChatDataset
from omnilong.data.packed_text import PackedTextDataset
from omnilong.data.packing import PackedDataset, packed_or_not


def stdlib_dir() -> Path:
    """The directory of this Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


_NOT_SOURCES = {"site-packages", "test", "tests", "idlelib", "__pycache__"}


def python_stdlib_sources(max_files: int = 0) -> list[Path]:
    """The ``.py`` files of this Python's standard library (tests and site-packages excluded),
    sorted; the first ``max_files`` when positive. Real source code present on every machine."""
    root = stdlib_dir()
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _NOT_SOURCES]  # not walked at all: site-packages is large
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    files.sort()
    return files[:max_files] if max_files > 0 else files


def python_stdlib_dataset(
    tokenizer, max_seq_len: int, max_files: int = 0, separator_token: str | None = None
) -> PackedTextDataset:
    """:class:`PackedTextDataset` over this Python's standard-library sources (the demo's
    corpus: real source code that exists on every machine)."""
    return PackedTextDataset(tokenizer, python_stdlib_sources(max_files), max_seq_len, separator_token=separator_token)


def _docstring_conversations(max_files: int) -> Iterable[tuple[str, Any]]:
    for path in python_stdlib_sources(max_files):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node):
                question = f"What does `{path.stem}.{node.name}` do?"
                yield (
                    f"{path}:{node.lineno}",
                    {
                        "messages": [
                            {"role": "user", "content": question},
                            {"role": "assistant", "content": ast.get_docstring(node)},
                        ]
                    },
                )


def python_stdlib_chat_dataset(
    tokenizer, max_seq_len: int, max_files: int = 0, skip_bad_samples: bool = False, packed: bool = True
) -> ChatDataset | PackedDataset:
    """:class:`ChatDataset` of questions about standard-library functions and classes,
    answered with their docstrings (the tiny stage-2 demo's data, present on every machine);
    ``packed`` as :func:`omnilong.data.chat_dataset`'s."""
    dataset = ChatDataset(
        tokenizer,
        _docstring_conversations(max_files),
        max_seq_len,
        skip_bad_samples,
        source="the Python standard library's docstrings",
    )
    return packed_or_not(dataset, packed)
