"""Hugging Face <-> native key map for Qwen2.5-VL, as data.

Checkpoints in the wild use two layouts: the hub one (``model.layers.*``, ``visual.*``,
``lm_head.*``) and the one transformers v5 holds in memory (``model.language_model.*``,
``model.visual.*``). Both are read; the hub layout is the one written.
"""

import re

import torch

# HF hub key template -> native key template; "{}" is the layer index.
HF_TO_NATIVE: dict[str, str] = {
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
    match = _LAYER_INDEX.search(key)
    if match is None:
        return table.get(key)
    template = table.get(key[: match.start()] + ".{}." + key[match.end():])
    return None if template is None else template.format(match.group(1))


def is_vision_key(hub_key: str) -> bool:
    return hub_key.startswith("visual.")


def hf_to_native(
    hf_state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Convert an HF state dict (either layout) to native keys.

    Returns:
        ``(native_state_dict, vision_keys, unknown_keys)``: the converted language-model
        tensors, the hub names of vision-tower tensors (not converted here), and the
        names of keys that match nothing in the map.
    """
    native, vision, unknown = {}, [], []
    for key, tensor in hf_state_dict.items():
        hub_key = to_hub_layout(key)
        if is_vision_key(hub_key):
            vision.append(hub_key)
            continue
        native_key = _map_key(hub_key, HF_TO_NATIVE)
        if native_key is None:
            unknown.append(key)
        else:
            native[native_key] = tensor
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
