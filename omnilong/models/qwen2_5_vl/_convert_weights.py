"""Hugging Face <-> native key map for Qwen2.5-VL, as data.

Checkpoints in the wild use two layouts: the hub one (``model.layers.*``, ``visual.*``,
``lm_head.*``) and the one transformers v5 holds in memory (``model.language_model.*``,
``model.visual.*``). Both are read; the hub layout is the one written.
"""

from omnilong.models.key_map import KeyMap

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
# transformers-v5 in-memory prefixes -> hub prefixes.
_V5_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def to_hub_layout(key: str) -> str:
    """Rewrite a transformers-v5 in-memory key to the hub layout (hub keys pass unchanged)."""
    for v5_prefix, hub_prefix in _V5_PREFIXES:
        if key.startswith(v5_prefix):
            return hub_prefix + key[len(v5_prefix) :]
    return key


def is_vision_key(key: str) -> bool:
    """Whether a hub or native key names a vision-tower tensor (both layouts use ``visual.``)."""
    return key.startswith("visual.")


KEY_MAP = KeyMap("Qwen2.5-VL", HF_TO_NATIVE, to_hub_layout, is_vision_key)
hf_to_native, native_to_hf = KEY_MAP.hf_to_native, KEY_MAP.native_to_hf
