"""Hugging Face <-> native key map for Qwen2.5-VL, as data.

Checkpoints in the wild use two layouts: the hub one (``model.layers.*``, ``visual.*``,
``lm_head.*``) and the one transformers v5 holds in memory (``model.language_model.*``,
``model.visual.*``). Both are read; the hub layout is the one written.
"""

import re

import torch

# HF hub key template -> native key template; "{}" is the layer (block) index.
HF_TO_NATIVE: dict[str, str] = {
    # vision tower: blocks named like the decoder layers, under "visual."
    "visual.patch_embed.proj.weight": "visual.patch_embed.proj.weight",
    "visual.blocks.{}.norm1.weight": "visual.layers.{}.attention_norm.weight",
    "visual.blocks.{}.norm2.weight": "visual.layers.{}.ffn_norm.weight",
    "visual.blocks.{}.attn.qkv.weight": "visual.layers.{}.attention.qkv.weight",
    "visual.blocks.{}.attn.qkv.bias": "visual.layers.{}.attention.qkv.bias",
    "visual.blocks.{}.attn.proj.weight": "visual.layers.{}.attention.wo.weight",
    "visual.blocks.{}.attn.proj.bias": "visual.layers.{}.attention.wo.bias",
    "visual.blocks.{}.mlp.gate_proj.weight": "visual.layers.{}.feed_forward.w1.weight",
    "visual.blocks.{}.mlp.gate_proj.bias": "visual.layers.{}.feed_forward.w1.bias",
    "visual.blocks.{}.mlp.up_proj.weight": "visual.layers.{}.feed_forward.w3.weight",
    "visual.blocks.{}.mlp.up_proj.bias": "visual.layers.{}.feed_forward.w3.bias",
    "visual.blocks.{}.mlp.down_proj.weight": "visual.layers.{}.feed_forward.w2.weight",
    "visual.blocks.{}.mlp.down_proj.bias": "visual.layers.{}.feed_forward.w2.bias",
    "visual.merger.ln_q.weight": "visual.merger.norm.weight",
    "visual.merger.mlp.0.weight": "visual.merger.w1.weight",
    "visual.merger.mlp.0.bias": "visual.merger.w1.bias",
    "visual.merger.mlp.2.weight": "visual.merger.w2.weight",
    "visual.merger.mlp.2.bias": "visual.merger.w2.bias",
    # language model
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.wq.bias",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.wk.bias",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.wv.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
NATIVE_TO_HF: dict[str, str] = {v: k for k, v in HF_TO_NATIVE.items()}

# transformers-v5 in-memory prefixes -> hub prefixes.
_V5_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def to_hub_layout(key: str) -> str:
    """Rewrite a transformers-v5 in-memory key to the hub layout (hub keys pass unchanged)."""
    for v5_prefix, hub_prefix in _V5_PREFIXES:
        if key.startswith(v5_prefix):
            return hub_prefix + key[len(v5_prefix):]
    return key


def _map_key(key: str, table: dict[str, str]) -> str | None:
    """``key`` through ``table``: an exact entry first, else the template with its first index as ``{}``."""
    if key in table:
        return table[key]
    match = _LAYER_INDEX.search(key)
    if match is None:
        return None
    template = table.get(key[: match.start()] + ".{}." + key[match.end():])
    return None if template is None else template.format(match.group(1))


def is_vision_key(key: str) -> bool:
    """Whether a hub or native key names a vision-tower tensor (both layouts use ``visual.``)."""
    return key.startswith("visual.")


def hf_to_native(
    hf_state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Convert an HF state dict (either layout) to native keys.

    Returns:
        ``(native_state_dict, vision_keys, unknown_keys)``: every converted tensor (language
        model and vision tower), the native names of the vision-tower tensors among them
        (for a text-only model to leave out), and the names of keys that match nothing in
        the map.
    """
    native, vision, unknown = {}, [], []
    for key, tensor in hf_state_dict.items():
        native_key = _map_key(to_hub_layout(key), HF_TO_NATIVE)
        if native_key is None:
            unknown.append(key)
            continue
        native[native_key] = tensor
        if is_vision_key(native_key):
            vision.append(native_key)
    return native, vision, unknown


def native_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert native keys to the HF hub layout.

    Raises:
        KeyError: naming a native key that has no HF name.
    """
    out = {}
    for key, tensor in state_dict.items():
        hf_key = _map_key(key, NATIVE_TO_HF)
        if hf_key is None:
            raise KeyError(f"native key {key!r} has no Hugging Face name in the Qwen2.5-VL key map")
        out[hf_key] = tensor
    return out
