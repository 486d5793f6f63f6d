"""The tensors of a Qwen2.5-VL Hugging Face checkpoint as its ``config.json`` describes them.

Each dimension carries the config key it comes from, so that a checkpoint and a config that
disagree are reported as the key to fix (``text_config.intermediate_size``), not as a
symptom further down (a RoPE section that does not add up, a size mismatch on load).
"""

from typing import Any

from omnilong.models.key_map import Dim
from omnilong.models.qwen2_5_vl.args import Qwen2_5_VLVisionArgs


def _text_dims(config: dict[str, Any]) -> tuple[dict[str, Dim], int]:
    """The language model's dimensions and its layer count."""
    nested = isinstance(config.get("text_config"), dict)
    text, at = ({**config, **config["text_config"]}, "text_config.") if nested else (config, "")
    missing = [
        k
        for k in ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_hidden_layers")
        if not isinstance(text.get(k), int)
    ]
    if missing:
        raise ValueError(f"config.json has no integer {', '.join(at + k for k in missing)}")
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    dims = {
        "H": (hidden, f"{at}hidden_size"),
        "I": (text["intermediate_size"], f"{at}intermediate_size"),
        "V": (text["vocab_size"], f"{at}vocab_size"),
        "KV": (kv_heads * (hidden // heads), f"{at}num_key_value_heads * {at}hidden_size / {at}num_attention_heads"),
    }
    return dims, text["num_hidden_layers"]


def _vision_dims(vision: dict[str, Any]) -> tuple[dict[str, Dim], int]:
    defaults = Qwen2_5_VLVisionArgs()
    get = lambda key, default: (vision.get(key, default), f"vision_config.{key}")  # noqa: E731
    dim, merge = get("hidden_size", defaults.dim), get("spatial_merge_size", defaults.spatial_merge_size)
    channels = (vision.get("in_channels", vision.get("in_chans", defaults.in_channels)), "vision_config.in_channels")
    return {
        "D": dim,
        "3D": (3 * dim[0], f"3 * {dim[1]}"),
        "F": get("intermediate_size", defaults.hidden_dim),
        "M": (dim[0] * merge[0] ** 2, f"{dim[1]} * {merge[1]}^2"),
        "O": get("out_hidden_size", defaults.out_dim),
        "C": channels,
        "T": get("temporal_patch_size", defaults.temporal_patch_size),
        "P": get("patch_size", defaults.patch_size),
    }, vision.get("depth", defaults.depth)


# HF hub key template ("{}": layer or block index) -> its dimensions, by name in the tables above.
_TEXT = {
    "model.embed_tokens.weight": ("V", "H"),
    "model.layers.{}.self_attn.q_proj.weight": ("H", "H"),
    "model.layers.{}.self_attn.q_proj.bias": ("H",),
    "model.layers.{}.self_attn.k_proj.weight": ("KV", "H"),
    "model.layers.{}.self_attn.k_proj.bias": ("KV",),
    "model.layers.{}.self_attn.v_proj.weight": ("KV", "H"),
    "model.layers.{}.self_attn.v_proj.bias": ("KV",),
    "model.layers.{}.self_attn.o_proj.weight": ("H", "H"),
    "model.layers.{}.mlp.gate_proj.weight": ("I", "H"),
    "model.layers.{}.mlp.up_proj.weight": ("I", "H"),
    "model.layers.{}.mlp.down_proj.weight": ("H", "I"),
    "model.layers.{}.input_layernorm.weight": ("H",),
    "model.layers.{}.post_attention_layernorm.weight": ("H",),
    "model.norm.weight": ("H",),
    "lm_head.weight": ("V", "H"),
}
_VISION = {
    "visual.patch_embed.proj.weight": ("D", "C", "T", "P", "P"),
    "visual.blocks.{}.norm1.weight": ("D",),
    "visual.blocks.{}.norm2.weight": ("D",),
    "visual.blocks.{}.attn.qkv.weight": ("3D", "D"),
    "visual.blocks.{}.attn.qkv.bias": ("3D",),
    "visual.blocks.{}.attn.proj.weight": ("D", "D"),
    "visual.blocks.{}.attn.proj.bias": ("D",),
    "visual.blocks.{}.mlp.gate_proj.weight": ("F", "D"),
    "visual.blocks.{}.mlp.gate_proj.bias": ("F",),
    "visual.blocks.{}.mlp.up_proj.weight": ("F", "D"),
    "visual.blocks.{}.mlp.up_proj.bias": ("F",),
    "visual.blocks.{}.mlp.down_proj.weight": ("D", "F"),
    "visual.blocks.{}.mlp.down_proj.bias": ("D",),
    "visual.merger.ln_q.weight": ("D",),
    "visual.merger.mlp.0.weight": ("M", "M"),
    "visual.merger.mlp.0.bias": ("M",),
    "visual.merger.mlp.2.weight": ("O", "M"),
    "visual.merger.mlp.2.bias": ("O",),
}


def _expand(table: dict[str, tuple[str, ...]], dims: dict[str, Dim], count: int) -> dict[str, tuple[Dim, ...]]:
    out = {}
    for template, names in table.items():
        for i in range(count) if "{}" in template else [None]:
            out[template.format(i) if i is not None else template] = tuple(dims[n] for n in names)
    return out


def hf_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[Dim, ...]]:
    """Every tensor (hub key layout) of a checkpoint with this parsed ``config.json``: each
    dimension's size and the config key it comes from. No ``visual.*`` without a
    ``vision_config``; ``lm_head.weight`` is optional when :func:`ties_embeddings`.

    Raises:
        ValueError: the config lacks a size it needs (names the key).
    """
    text_dims, layers = _text_dims(config)
    shapes = _expand(_TEXT, text_dims, layers)
    if config.get("vision_config"):
        vision_dims, depth = _vision_dims(config["vision_config"])
        shapes.update(_expand(_VISION, vision_dims, depth))
    return shapes


def ties_embeddings(config: dict[str, Any]) -> bool:
    """Whether the output projection is the token embedding (``lm_head.weight`` may be absent)."""
    return bool(config.get("tie_word_embeddings") or (config.get("text_config") or {}).get("tie_word_embeddings"))
