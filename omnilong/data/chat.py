"""Stage 2 data: chat samples formatted with the tokenizer's chat template.

A sample is ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
in JSONL / JSON / parquet files. Labels are -100 everywhere except on the tokens of
assistant turns (their content and end-of-turn token).

Chat templates expect one of two content structures: a plain string (Qwen2.5's, which also
takes lists) or a list of typed parts (LLaVA-OneVision's hub template iterates
``[{"type": "text", "text": ...}]`` and renders a string as nothing).
:func:`chat_content_form` finds which by rendering a probe conversation, and
:func:`render_chat` renders with it; every rendered conversation is checked to hold each
message's text, in order, so a template that drops text is refused instead of trained on.
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
_PROBE = ("omnilong probe question 7", "omnilong probe answer 9")
_CONTENT_FORMS: dict[str, str] = {}  # chat template -> "string" | "parts"


def _template_name(tokenizer) -> str:
    return f"the chat template of {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}"


def _as_parts(messages: list[dict]) -> list[dict]:
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]


def chat_content_form(tokenizer) -> str:
    """``"string"`` when the tokenizer's chat template renders plain string contents, else
    ``"parts"`` when it renders lists of text parts (``[{"type": "text", "text": ...}]``).

    Found once per template by rendering a user and an assistant turn each way.

    Raises:
        ValueError: the tokenizer has no chat template, or its template renders the probe's
            text in neither structure (names the tokenizer).
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
    key = repr(template)
    if key not in _CONTENT_FORMS:
        probe = [{"role": "user", "content": _PROBE[0]}, {"role": "assistant", "content": _PROBE[1]}]
        for form, messages in (("string", probe), ("parts", _as_parts(probe))):
            if all(t in tokenizer.apply_chat_template(messages, tokenize=False) for t in _PROBE):
                _CONTENT_FORMS[key] = form
                break
        else:
            raise ValueError(
                f"{_template_name(tokenizer)} renders a message's text neither from a string content "
                'nor from [{"type": "text", "text": ...}] parts; use a template that renders it'
            )
    return _CONTENT_FORMS[key]


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """``messages`` (string contents) rendered with the tokenizer's chat template, in the content
    structure the template expects (:func:`chat_content_form`)."""
    if chat_content_form(tokenizer) == "parts":
        messages = _as_parts(messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def check_texts_rendered(tokenizer, messages: list[dict], text: str) -> None:
    """Raise ``ValueError`` (naming the template and the message) unless each message's text
    (stripped) appears in the rendered ``text``, in order."""
    cursor = 0
    for i, message in enumerate(messages):
        content = message["content"].strip()
        at = text.find(content, cursor)
        if at < 0:
            raise ValueError(
                f"{_template_name(tokenizer)} drops or changes the text of message {i} ({message['role']}): "
                f"{content!r:.80} is not in its rendering; fix the template or the data"
            )
        cursor = at + len(content)


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
            rendered prefix is not a prefix of the whole), or drops a message's text
            (:func:`check_texts_rendered`).
    """
    text = render_chat(tokenizer, messages)
    check_texts_rendered(tokenizer, messages, text)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = render_chat(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(f"{_template_name(tokenizer)} does not render conversations incrementally")
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
        chat_content_form(tokenizer)  # refuses a tokenizer without a usable chat template
        self.max_seq_len = max_seq_len
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.num_skipped = 0
        self._samples: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._lengths: list[int] = []
        for origin, record in samples:
            messages = _validate_messages(origin, record)
            try:
                input_ids, labels = self._tokenize(tokenizer, messages)
            except ValueError as e:
                raise ValueError(f"{origin}: {e}") from None
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
