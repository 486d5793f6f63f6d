from omnilong.data.chat import ChatDataset
from omnilong.data.collate import collate_padded
from omnilong.data.packed_text import PackedTextDataset, python_stdlib_dataset
from omnilong.data.tokenizer import load_tokenizer

__all__ = ["ChatDataset", "PackedTextDataset", "collate_padded", "load_tokenizer", "python_stdlib_dataset"]
