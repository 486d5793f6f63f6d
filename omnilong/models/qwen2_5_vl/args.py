"""Qwen2.5-VL model arguments, read from a Hugging Face ``config.json`` in either layout."""

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Qwen2_5_VLTextArgs:
    """Shape of the Qwen2.5-VL language model (a Qwen2 decoder with M-RoPE)."""

    vocab_size: int = 152064
    dim: int = 3584
    n_layers: int = 28
    n_heads: int = 28
    n_kv_heads: int = 4
    hidden_dim: int = 18944
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128000
    # Special token ids, from the config (never constants).
    image_token_id: Optional[int] = 151655
    video_token_id: Optional[int] = 151656
    vision_start_token_id: Optional[int] = 151652
    vision_end_token_id: Optional[int] = 151653

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        """Raise ``ValueError`` when the shape is not one the model can be built with."""
        if self.dim % self.n_heads:
            raise ValueError(f"hidden_size {self.dim} is not divisible by num_attention_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"num_attention_heads {self.n_heads} is not a multiple of num_key_value_heads {self.n_kv_heads}")
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(
                f"mrope_section {self.mrope_section} sums to {sum(self.mrope_section)}, "
                f"but head_dim / 2 = {self.head_dim // 2}"
            )


_SUPPORTED_ROPE_TYPES = (None, "default", "mrope")


def text_args_from_hf_config(config: dict[str, Any]) -> Qwen2_5_VLTextArgs:
    """Build :class:`Qwen2_5_VLTextArgs` from a parsed ``config.json``.

    Accepts the published layout (text fields at the top level, ``rope_theta`` and
    ``rope_scaling = {"type": "mrope", "mrope_section": [...]}``) and the nested one
    written by newer transformers (``text_config`` with ``rope_parameters``). Fields
    of ``text_config`` take precedence over top-level ones.

    Raises:
        ValueError: for a model type, activation, rope type or sliding-window setting
            the native model does not implement, naming the field.
    """
    model_type = config.get("model_type")
    if model_type not in ("qwen2_5_vl", "qwen2_5_vl_text"):
        raise ValueError(f"config.json has model_type={model_type!r}; expected 'qwen2_5_vl'")
    text = {**config, **(config.get("text_config") or {})}

    act = text.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r} is not supported (the native MLP is SwiGLU with silu)")
    if text.get("use_sliding_window"):
        raise ValueError("config.json sets use_sliding_window=true, which the native model does not implement")

    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config.json rope type {rope_type!r} is not supported; supported: default, mrope")
    rope_theta = rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))
    if "mrope_section" not in rope:
        raise ValueError("config.json has no mrope_section (expected in rope_scaling or rope_parameters)")

    tie = bool(config.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
    args = Qwen2_5_VLTextArgs(
        vocab_size=text["vocab_size"],
        dim=text["hidden_size"],
        n_layers=text["num_hidden_layers"],
        n_heads=text["num_attention_heads"],
        n_kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
        hidden_dim=text["intermediate_size"],
        norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        mrope_section=list(rope["mrope_section"]),
        tie_word_embeddings=tie,
        max_position_embeddings=text.get("max_position_embeddings", 128000),
        image_token_id=config.get("image_token_id"),
        video_token_id=config.get("video_token_id"),
        vision_start_token_id=config.get("vision_start_token_id"),
        vision_end_token_id=config.get("vision_end_token_id"),
    )
    args.validate()
    return args
