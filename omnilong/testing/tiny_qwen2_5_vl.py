"""A tiny random Qwen2.5-VL checkpoint and tokenizer, built locally (nothing is downloaded).

Used by the demo and the tests: a real Hugging Face model directory (config.json,
safetensors, tokenizer with a chat template) whose shapes are Qwen2.5-VL's, scaled down.
"""

import json
from pathlib import Path

import torch

from omnilong.testing.tiny_tokenizer import SPECIAL_TOKENS, train_tiny_tokenizer

# Pixel bounds of the tiny checkpoint's image and video processors: small frames (e.g.
# 56x84) keep their size, so a tiny video costs a few LLM tokens per frame pair.
TINY_MIN_PIXELS = 4 * 28 * 28
TINY_MAX_PIXELS = 16 * 28 * 28


def write_tiny_qwen2_5_vl(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 176,
    nested_config: bool = True,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a tiny random ``Qwen2_5_VLForConditionalGeneration`` checkpoint with tokenizer.

    Args:
        out_dir: directory to create (overwritten files if it exists).
        seed: seed of the random weights.
        nested_config: write config.json in the nested ``text_config`` layout of newer
            transformers (True) or the published flat layout with ``rope_scaling`` (False).

    Returns:
        ``out_dir`` as a Path.
    """
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out_dir = Path(out_dir)
    tokenizer = train_tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64
    # Qwen2.5-VL's proportions: [16, 24, 24] of 64 frequencies -> temporal 1/4, height and width 3/8.
    half = hidden_size // num_attention_heads // 2
    temporal = half // 4
    height = (half - temporal) // 2
    mrope_section = [temporal, height, half - temporal - height]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            rms_norm_eps=1e-6,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[1],
            window_size=56,
            tokens_per_second=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_tiny_processor_configs(out_dir)
    if not nested_config:
        _flatten_config(out_dir / "config.json")
    return out_dir


def write_tiny_processor_configs(out_dir: str | Path) -> None:
    """Write ``preprocessor_config.json`` and ``video_preprocessor_config.json`` (Qwen2-VL
    image and video processors with the tiny pixel bounds) into ``out_dir``."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS}
    Qwen2VLImageProcessor(size=size).save_pretrained(out_dir)
    Qwen2VLVideoProcessor(size=size).save_pretrained(out_dir)


def _flatten_config(path: Path) -> None:
    """Rewrite a nested config.json in the published flat layout (text fields at the top,
    ``rope_theta`` and ``rope_scaling = {"type": "mrope", "mrope_section": ...}``)."""
    config = json.loads(path.read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    text.pop("model_type", None)
    config.update(text)
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    path.write_text(json.dumps(config, indent=2) + "\n")
