"""A tiny random LLaVA-OneVision checkpoint, tokenizer and processor, built locally (nothing
is downloaded).

Used by the demo and the tests: a real Hugging Face model directory whose shapes are
llava-onevision-qwen2-7b-ov-hf's scaled down: 42 px crops of 3x3 patches (pooled to 2x2 per
video frame), pinpoints of 1 to 6 crops per side as the 7B's 384..2304, ``anyres_max_9``.
"""

from pathlib import Path

import torch

from omnilong.models.families import FAMILIES
from omnilong.testing.tiny_tokenizer import train_tiny_tokenizer

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
TINY_CROP = 42  # pixels per crop side (the 7B: 384)
TINY_PATCH = 14
TINY_PINPOINTS = [
    [h, w]
    for h in range(TINY_CROP, 6 * TINY_CROP + 1, TINY_CROP)
    for w in range(TINY_CROP, 6 * TINY_CROP + 1, TINY_CROP)
]
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]  # the 7B processors' normalisation

# ChatML as llava-onevision-qwen2-7b-ov-hf's hub template renders it (no default system turn):
# it iterates each message's content parts, putting each image's ``<image>\n`` first, then
# each video's ``<video>\n``, then the text parts; like the hub's, it renders a plain string
# content as nothing (the data code renders with text parts: omnilong.data.chat).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{- '<image>\\n' }}{%- endfor %}"
    "{%- for item in message['content'] | selectattr('type', 'equalto', 'video') %}{{- '<video>\\n' }}{%- endfor %}"
    "{%- for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{- item['text'] }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def write_tiny_llava_onevision(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 176,
) -> Path:
    """Write a tiny random ``LlavaOnevisionForConditionalGeneration`` checkpoint (in the hub
    layout of llava-onevision-qwen2-7b-ov-hf, ``vision_tower.vision_model.*``),
    its tokenizer (the tiny Qwen one plus ``<image>`` and ``<video>``) and its processor.

    Returns:
        ``out_dir`` as a Path.
    """
    from transformers import (
        GenerationConfig,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    out_dir = Path(out_dir)
    tokenizer = train_tiny_tokenizer(chat_template=CHAT_TEMPLATE, extra_special_tokens=(IMAGE_TOKEN, VIDEO_TOKEN))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", IMAGE_TOKEN, VIDEO_TOKEN)}
    vocab_size = -(-len(tokenizer) // 64) * 64
    config = LlavaOnevisionConfig(
        text_config=dict(
            model_type="qwen2",
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            rms_norm_eps=1e-6,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=TINY_CROP,
            patch_size=TINY_PATCH,
            vision_use_head=False,
        ),
        image_token_index=ids[IMAGE_TOKEN],
        video_token_index=ids[VIDEO_TOKEN],
        image_grid_pinpoints=TINY_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    model.save_pretrained(out_dir)
    _rewrite_in_hub_layout(out_dir / "model.safetensors")
    size = {"height": TINY_CROP, "width": TINY_CROP}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=size, image_grid_pinpoints=TINY_PINPOINTS, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD
        ),
        video_processor=LlavaOnevisionVideoProcessor(size=size, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD),
        tokenizer=tokenizer,
        num_image_tokens=(TINY_CROP // TINY_PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return out_dir


def _rewrite_in_hub_layout(path: Path) -> None:
    """Rename the tensors of a safetensors file written by transformers v5 to the hub layout."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file(
        {FAMILIES["llava_onevision"].to_hub_layout(k): v for k, v in tensors.items()}, path, metadata={"format": "pt"}
    )
