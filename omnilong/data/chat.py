"""Stage 2 data: chat samples formatted with the tokenizer's chat template.

A sample is ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
in JSONL / JSON / parquet files. Labels are -100 everywhere except on the tokens of
assistant turns (their content and end-of-turn token).
"""

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from omnilong.constants import IGNORE_INDEX
from omnilong.data.packing import PackedDataset, packed_or_not
from omnilong.data.sources import PathLike, expand_data_files, read_records

logger = logging.getLogger(__name__)

_ROLES = ("system", "user", "assistant")


def _validate_messages(origin: str, record) -> list[dict]:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{origin}: expected an object with a non-empty list 'messages'")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ValueError(
                f"{origin}: message {i} must be {{'role': one of {list(_ROLES)}, 'content': str}}, got {m!r:.200}"
            )
    return messages


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A turn's span runs from the end of the generation prompt before it to the end of the
    conversation rendered up to and including it.

    Raises:
        ValueError: the chat template does not render conversations incrementally (a
            rendered prefix is not a prefix of the whole).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError("the tokenizer's chat template does not render conversations incrementally")
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids [T]`` of the rendered conversation and ``trainable [T]`` (bool: the token
    starts inside an assistant turn)."""
    text, spans = assistant_char_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = torch.tensor(encoded["input_ids"])
    starts = torch.tensor([start for start, _ in encoded["offset_mapping"]])
    trainable = torch.zeros(len(input_ids), dtype=torch.bool)
    for lo, hi in spans:
        trainable |= (starts >= lo) & (starts < hi)
    return input_ids, trainable


def shifted_labels(input_ids: torch.Tensor, trainable: torch.Tensor) -> torch.Tensor:
    """Labels shifted once on the full sequence: position ``t`` predicts token ``t + 1`` when
    that token is trained, else -100 (and the last position predicts nothing)."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:-1] = torch.where(trainable[1:], input_ids[1:], IGNORE_INDEX)
    return labels


class ChatDataset(Dataset):
    """Chat samples, tokenized once at construction.

    Args:
        tokenizer: a transformers fast tokenizer with a chat template.
        samples: ``(origin, record)`` pairs; ``origin`` (e.g. ``"file:line"``) names the
            sample in errors.
        max_seq_len: maximum tokens per sample.
        skip_bad_samples: skip (and count in ``num_skipped``) samples longer than
            ``max_seq_len`` instead of raising.
        source: what the samples were read from (e.g. the file names), for errors.

    Raises:
        ValueError: a malformed sample (names it), a sample that is too long (unless
            skipped), or no samples at all.
    """

    def __init__(
        self,
        tokenizer,
        samples: Iterable[tuple[str, Any]],
        max_seq_len: int,
        skip_bad_samples: bool = False,
        source: str = "the dataset",
    ):
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; stage-2 chat data needs one")
        self.max_seq_len = max_seq_len
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.num_skipped = 0
        self._samples: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._lengths: list[int] = []
        for origin, record in samples:
            input_ids, labels = self._tokenize(tokenizer, _validate_messages(origin, record))
            if len(input_ids) > max_seq_len:
                if not skip_bad_samples:
                    raise ValueError(
                        f"{origin}: sample has {len(input_ids)} tokens, more than max_seq_len={max_seq_len} "
                        "(raise max_seq_len or set skip_bad_samples: true to skip such samples)"
                    )
                self.num_skipped += 1
                continue
            self._samples.append((input_ids, labels))
            self._lengths.append(len(input_ids))
        if not self._samples:
            skipped = f" ({self.num_skipped} longer than max_seq_len={max_seq_len} skipped)" if self.num_skipped else ""
            raise ValueError(f"no usable chat sample in {source}{skipped}")
        if self.num_skipped:
            logger.warning("skipped %d samples longer than max_seq_len=%d", self.num_skipped, max_seq_len)

    @classmethod
    def from_tokenized(
        cls,
        samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
        lengths: Sequence[int],
        max_seq_len: int,
        pad_id: int,
        num_skipped: int = 0,
    ) -> "ChatDataset":
        """A dataset over samples tokenized beforehand, ``(input_ids [T], labels [T])`` each, e.g.
        the lazy view of a prepared directory (:func:`omnilong.data.prepared_chat_dataset`);
        ``lengths`` are their ``T``s (read without building the samples); ``num_skipped``
        counts the samples left out of ``samples``."""
        dataset = cls.__new__(cls)
        dataset.max_seq_len, dataset.pad_id, dataset.num_skipped = max_seq_len, pad_id, num_skipped
        dataset._samples, dataset._lengths = samples, lengths
        return dataset

    @staticmethod
    def _tokenize(tokenizer, messages: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, trainable = tokenize_conversation(tokenizer, messages)
        return input_ids, shifted_labels(input_ids, trainable)

    def __len__(self) -> int:
        return len(self._samples)

    def sample_lengths(self) -> list[int]:
        """Tokens of each sample (what :class:`~omnilong.data.packing.PackedDataset` packs by)."""
        return [int(n) for n in self._lengths]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Sample ``index``: ``input_ids``, ``labels``, ``position_ids``, ``document_ids``, each ``[T]``."""
        input_ids, labels = self._samples[index]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": torch.arange(len(input_ids)),
            "document_ids": torch.zeros(len(input_ids), dtype=torch.long),
        }


def chat_dataset(
    tokenizer,
    data_files: PathLike | Sequence[PathLike],
    max_seq_len: int,
    skip_bad_samples: bool = False,
    packed: bool = True,
) -> ChatDataset | PackedDataset:
    """:class:`ChatDataset` over JSONL / JSON / parquet files (paths, directories or globs);
    ``packed``: several samples per row (:mod:`omnilong.data.packing`), else one per row."""
    files = expand_data_files(data_files)
    samples = (sample for path in files for sample in read_records(path))
    dataset = ChatDataset(tokenizer, samples, max_seq_len, skip_bad_samples, source=", ".join(map(str, files)))
    return packed_or_not(dataset, packed)
