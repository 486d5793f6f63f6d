"""Test fixtures shipped with the package, as ``torch.testing`` is: the tiny random checkpoints
and their tokenizer, tiny evaluation data and the standard-library demo datasets. Tests, tools,
the demo and the tiny configs use them; the training and evaluation library never imports them."""

from omnilong.testing.stdlib_data import python_stdlib_chat_dataset, python_stdlib_dataset, python_stdlib_sources
from omnilong.testing.tiny_eval_data import write_needle_image, write_tiny_videomme
from omnilong.testing.tiny_llava_onevision import write_tiny_llava_onevision
from omnilong.testing.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl
from omnilong.testing.tiny_tokenizer import train_tiny_tokenizer

__all__ = [
    "python_stdlib_chat_dataset",
    "python_stdlib_dataset",
    "python_stdlib_sources",
    "train_tiny_tokenizer",
    "write_needle_image",
    "write_tiny_llava_onevision",
    "write_tiny_qwen2_5_vl",
    "write_tiny_videomme",
]
