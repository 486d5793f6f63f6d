"""The tiny byte-level BPE tokenizer of the tiny checkpoints, learnt locally from a few
standard-library modules (nothing is downloaded), with Qwen's special tokens and ChatML."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from omnilong.testing.stdlib_data import stdlib_dir

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# ChatML, as the Qwen2.5 instruct models use it; a system turn is added when absent. String
# contents render as they are; list contents (transformers' multimodal messages) render
# each ``{"type": "video"}`` / ``{"type": "image"}`` item as its vision placeholder, as
# Qwen2.5-VL's own template does, and ``{"type": "text", "text": ...}`` items as their text.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'video' or 'video' in item %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'image' or 'image' in item %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item %}{{- item['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Standard-library modules the tiny tokenizer learns its merges from: present in every
# CPython 3.10+ installation, so the tokenizer is the same on every machine.
_TOKENIZER_CORPUS = [
    "argparse.py",
    "collections/__init__.py",
    "dataclasses.py",
    "functools.py",
    "json/decoder.py",
    "pathlib.py",
    "textwrap.py",
    "typing.py",
]


def train_tiny_tokenizer(vocab_size: int = 1024, chat_template: str = CHAT_TEMPLATE, extra_special_tokens: tuple = ()):
    """A byte-level BPE tokenizer learnt from a few standard-library modules, with the
    Qwen special tokens (then ``extra_special_tokens``) and a ChatML chat template, as a
    transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = [str(stdlib_dir() / name) for name in _TOKENIZER_CORPUS]
    tok.train(files, trainer)
    tok.add_special_tokens(list(extra_special_tokens))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
        model_max_length=1 << 20,
    )
