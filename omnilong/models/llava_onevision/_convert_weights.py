"""Hugging Face <-> native key map for LLaVA-OneVision, as data.

The hub layout (``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``image_newline``,
``language_model.model.*``, ``language_model.lm_head.weight``) is the one written; the one
transformers v5 holds in memory (``model.vision_tower.*``, ``model.language_model.*``,
``lm_head.weight``, ...) and the one its ``save_pretrained`` writes (the hub's, with the
tower as ``vision_tower.*``) are read too.
"""

from omnilong.models.key_map import KeyMap

_TOWER = "vision_tower.vision_model."
# HF hub key template -> native key template; "{}" is the layer index.
HF_TO_NATIVE: dict[str, str] = {
    _TOWER + "embeddings.patch_embedding.weight": "visual.patch_embed.weight",
    _TOWER + "embeddings.patch_embedding.bias": "visual.patch_embed.bias",
    _TOWER + "embeddings.position_embedding.weight": "visual.pos_embed.weight",
    **{
        f"{_TOWER}encoder.layers.{{}}.{hf}.{p}": f"visual.layers.{{}}.{native}.{p}"
        for hf, native in (
            ("layer_norm1", "attention_norm"),
            ("layer_norm2", "ffn_norm"),
            ("self_attn.q_proj", "attention.wq"),
            ("self_attn.k_proj", "attention.wk"),
            ("self_attn.v_proj", "attention.wv"),
            ("self_attn.out_proj", "attention.wo"),
            ("mlp.fc1", "feed_forward.w1"),
            ("mlp.fc2", "feed_forward.w2"),
        )
        for p in ("weight", "bias")
    },
    _TOWER + "post_layernorm.weight": "visual.post_norm.weight",
    _TOWER + "post_layernorm.bias": "visual.post_norm.bias",
    "multi_modal_projector.linear_1.weight": "projector.w1.weight",
    "multi_modal_projector.linear_1.bias": "projector.w1.bias",
    "multi_modal_projector.linear_2.weight": "projector.w2.weight",
    "multi_modal_projector.linear_2.bias": "projector.w2.bias",
    "image_newline": "image_newline",
    "language_model.model.embed_tokens.weight": "tok_embeddings.weight",
    "language_model.model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "language_model.model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.wq.bias",
    "language_model.model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "language_model.model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.wk.bias",
    "language_model.model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "language_model.model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.wv.bias",
    "language_model.model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "language_model.model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "language_model.model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "language_model.model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "language_model.model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "language_model.model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "language_model.model.norm.weight": "norm.weight",
    "language_model.lm_head.weight": "output.weight",
}

# transformers-v5 in-memory prefixes -> hub prefixes (longest first).
_V5_PREFIXES = (
    ("model.vision_tower.", _TOWER),
    ("model.language_model.", "language_model.model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
    ("lm_head.", "language_model.lm_head."),
)


def to_hub_layout(key: str) -> str:
    """Rewrite a transformers-v5 key (in memory or saved) to the hub layout (hub keys pass unchanged)."""
    for v5_prefix, hub_prefix in _V5_PREFIXES:
        if key.startswith(v5_prefix):
            return hub_prefix + key[len(v5_prefix) :]
    if key.startswith("vision_tower.") and not key.startswith(_TOWER):
        return _TOWER + key[len("vision_tower.") :]
    return key


def is_vision_key(key: str) -> bool:
    """Whether a native key names a vision-side tensor (tower, projector, newline)."""
    return key.startswith(("visual.", "projector.")) or key == "image_newline"


KEY_MAP = KeyMap("LLaVA-OneVision", HF_TO_NATIVE, to_hub_layout, is_vision_key)
hf_to_native, native_to_hf = KEY_MAP.hf_to_native, KEY_MAP.native_to_hf
