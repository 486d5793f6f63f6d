from omnilong.data.chat import ChatDataset, chat_dataset, python_stdlib_chat_dataset
from omnilong.data.collate import collate_padded
from omnilong.data.packed_text import PackedTextDataset, python_stdlib_dataset
from omnilong.data.tokenizer import load_tokenizer

__all__ = [
    "ChatDataset",
    "PackedTextDataset",
    "chat_dataset",
    "collate_padded",
    "load_tokenizer",
    "python_stdlib_chat_dataset",
    "python_stdlib_dataset",
]
