"""Stage 1 data: documents tokenized and packed into rows of ``max_seq_len`` tokens."""

import logging
from typing import Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from omnilong.data.sources import PathLike, expand_data_files, python_stdlib_sources, read_text_documents

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"separator token {token!r} is not in the tokenizer's vocabulary")
    return token_id


class PackedTextDataset(Dataset):
    """Documents joined into one token stream, ``separator`` after each, cut into rows.

    Every row has exactly ``max_seq_len`` tokens (the last one is padded with
    ``pad_token`` in a document of its own, labels ignored), so nothing is dropped.
    Within a row each document segment has its own document id (0, 1, ...) and
    positions counted from 0; a document cut by a row boundary continues in the next row.
    Labels are the next token of the stream, shifted once here on the full sequence:
    the target of a document's last real token is the separator, the separator itself
    has no target (the next document is unrelated).

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
        data_files: Union[PathLike, Sequence[PathLike]],
        max_seq_len: int,
        text_column: str = "text",
        separator_token: Optional[str] = None,
    ):
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        separator = _token_id(tokenizer, separator_token or tokenizer.eos_token)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else separator

        files = expand_data_files(data_files)
        texts = [text for _, text in read_text_documents(files, text_column)]
        self.num_empty_documents = sum(1 for t in texts if not t.strip())
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ValueError(f"no non-empty document in data_files {[str(f) for f in files][:5]}")
        self.num_documents = len(texts)

        token_lists = tokenizer(texts, add_special_tokens=False)["input_ids"]
        lengths = torch.tensor([len(t) + 1 for t in token_lists])
        stream = torch.tensor([tok for tokens in token_lists for tok in (*tokens, separator)], dtype=torch.int32)
        targets = torch.full_like(stream, IGNORE_INDEX)
        targets[:-1] = stream[1:]
        targets[lengths.cumsum(0) - 1] = IGNORE_INDEX  # the separator predicts nothing
        self.num_tokens = len(stream)
        self._stream = stream
        self._targets = targets
        self._document = torch.repeat_interleave(torch.arange(len(texts), dtype=torch.int32), lengths)
        if self.num_empty_documents:
            logger.warning("skipped %d empty documents", self.num_empty_documents)

    def __len__(self) -> int:
        return -(-self.num_tokens // self.max_seq_len)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Row ``index``: ``input_ids``, ``labels``, ``position_ids``, ``document_ids``, each ``[max_seq_len]``."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.max_seq_len
        end = min(start + self.max_seq_len, self.num_tokens)
        pad = self.max_seq_len - (end - start)
        input_ids = self._stream[start:end].long()
        labels = self._targets[start:end].long()
        document = self._document[start:end].long()
        if pad:
            input_ids = torch.cat([input_ids, torch.full((pad,), self.pad_id)])
            labels = torch.cat([labels, torch.full((pad,), IGNORE_INDEX)])
            document = torch.cat([document, torch.full((pad,), int(document[-1]) + 1)])
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": positions_within_documents(document),
            "document_ids": document - document[0],
        }


def positions_within_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """``[T]`` offset of each token from the first token of its (contiguous) document segment."""
    t = document_ids.shape[-1]
    index = torch.arange(t)
    starts = torch.zeros(t, dtype=torch.bool)
    starts[0] = True
    starts[1:] = document_ids[1:] != document_ids[:-1]
    segment_start = torch.cummax(torch.where(starts, index, 0), dim=0).values
    return index - segment_start


def python_stdlib_dataset(
    tokenizer, max_seq_len: int, max_files: int = 0, separator_token: Optional[str] = None
) -> PackedTextDataset:
    """:class:`PackedTextDataset` over this Python's standard-library sources (the demo's
    corpus: real source code that exists on every machine)."""
    return PackedTextDataset(tokenizer, python_stdlib_sources(max_files), max_seq_len,
                             separator_token=separator_token)
