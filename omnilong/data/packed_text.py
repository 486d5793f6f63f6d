"""Stage 1 data: documents tokenized and packed into rows of ``max_seq_len`` tokens."""

import itertools
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from omnilong.constants import IGNORE_INDEX
from omnilong.data.sources import PathLike, expand_data_files, read_text_documents
from omnilong.documents import positions_within_documents

logger = logging.getLogger(__name__)


def separator_id(tokenizer, separator_token: str | None = None) -> int:
    """The id of ``separator_token`` (default: the tokenizer's EOS token).

    Raises:
        ValueError: the token is not in the tokenizer's vocabulary.
    """
    token = separator_token or tokenizer.eos_token
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"separator token {token!r} is not in the tokenizer's vocabulary")
    return token_id


def row_pad_id(tokenizer, separator: int) -> int:
    """The padding id of packed rows: the tokenizer's pad token, else the separator."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else separator


def tokenize_documents(tokenizer, texts: Sequence[str], separator: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> one token stream with ``separator`` after each.

    Returns:
        ``tokens [sum(lengths)]`` (uint32) and ``lengths [len(texts)]`` (int64, separator included).
    """
    token_lists = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    tokens = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.uint32, count=int(lengths.sum()))
    return np.insert(tokens, np.cumsum(lengths), separator), lengths + 1


class PackedRows(Dataset):
    """A token stream of documents cut into rows of ``max_seq_len`` tokens.

    Every row has exactly ``max_seq_len`` tokens (the last one is padded with ``pad_id``
    in a document of its own, labels ignored), so nothing is dropped. Within a row each
    document segment has its own document id (0, 1, ...) and positions counted from 0; a
    document cut by a row boundary continues in the next row. Labels are the next token
    of the stream, shifted once on the full sequence; a document's last token (its
    separator) has no target (the next document is unrelated).

    A row is built from slices when it is asked for, so ``tokens`` and ``offsets`` may be
    memory maps of any size: only the row's pages are read.

    Args:
        tokens: ``[N]`` token ids of all documents, back to back.
        offsets: ``[D + 1]`` int64, document ``d`` is ``tokens[offsets[d]:offsets[d + 1]]``.
        max_seq_len: tokens per row.
        pad_id: token id of the padding of the last row.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, max_seq_len: int, pad_id: int):
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.tokens, self.offsets, self.max_seq_len, self.pad_id = tokens, offsets, max_seq_len, pad_id
        self.num_tokens, self.num_documents = len(tokens), len(offsets) - 1

    def __len__(self) -> int:
        return -(-self.num_tokens // self.max_seq_len)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Row ``index``: ``input_ids``, ``labels``, ``position_ids``, ``document_ids``, each ``[max_seq_len]``."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.max_seq_len
        end = min(start + self.max_seq_len, self.num_tokens)
        first, last = np.searchsorted(self.offsets, [start, end - 1], side="right") - 1
        doc_ends = np.asarray(self.offsets[first + 1 : last + 2])  # exclusive ends of the row's documents
        positions = np.arange(start, end)
        document = np.searchsorted(doc_ends, positions, side="right")  # [n] 0 for the row's first document
        following = np.asarray(self.tokens[start + 1 : end + 1], dtype=np.int64)  # [n], [n - 1] at the stream end
        labels = np.full(end - start, IGNORE_INDEX, dtype=np.int64)
        labels[: len(following)] = following
        labels[positions == doc_ends[document] - 1] = IGNORE_INDEX  # a document's last token predicts nothing
        input_ids = torch.from_numpy(np.asarray(self.tokens[start:end], dtype=np.int64))
        labels, document = torch.from_numpy(labels), torch.from_numpy(document)
        pad = self.max_seq_len - (end - start)
        if pad:
            input_ids = torch.cat([input_ids, torch.full((pad,), self.pad_id)])
            labels = torch.cat([labels, torch.full((pad,), IGNORE_INDEX)])
            document = torch.cat([document, torch.full((pad,), int(document[-1]) + 1)])
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": positions_within_documents(document),
            "document_ids": document,
        }


class PackedTextDataset(PackedRows):
    """:class:`PackedRows` of raw text files, tokenized in memory at construction (small
    corpora and the demo; large ones are prepared once with ``tools/prepare_data.py`` and
    read with :func:`omnilong.data.prepared_text_dataset`, which gives the same rows).

    Args:
        tokenizer: a transformers tokenizer (fast).
        data_files: text files (one document each), JSONL / JSON / parquet files
            (one document per record's ``text_column``), directories or globs.
        max_seq_len: tokens per row.
        text_column: field holding the text in structured files.
        separator_token: token appended to each document (default: the tokenizer's EOS).

    Raises:
        ValueError: ``max_seq_len`` not positive, no non-empty document, or bad records.
    """

    def __init__(
        self,
        tokenizer,
        data_files: PathLike | Sequence[PathLike],
        max_seq_len: int,
        text_column: str = "text",
        separator_token: str | None = None,
    ):
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        separator = separator_id(tokenizer, separator_token)
        files = expand_data_files(data_files)
        texts = [text for _, text in read_text_documents(files, text_column)]
        self.num_empty_documents = sum(1 for t in texts if not t.strip())
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ValueError(f"no non-empty document in data_files {[str(f) for f in files][:5]}")
        tokens, lengths = tokenize_documents(tokenizer, texts, separator)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        super().__init__(tokens, offsets, max_seq_len, row_pad_id(tokenizer, separator))
        if self.num_empty_documents:
            logger.warning("skipped %d empty documents", self.num_empty_documents)
