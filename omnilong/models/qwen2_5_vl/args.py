"""Qwen2.5-VL model arguments, read from a Hugging Face ``config.json`` in either layout."""

from dataclasses import dataclass, field
from typing import Any


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
    image_token_id: int | None = 151655
    video_token_id: int | None = 151656
    vision_start_token_id: int | None = 151652
    vision_end_token_id: int | None = 151653

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        """Raise ``ValueError`` when the shape is not one the model can be built with."""
        if self.dim % self.n_heads:
            raise ValueError(f"hidden_size {self.dim} is not divisible by num_attention_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.n_heads} is not a multiple of num_key_value_heads {self.n_kv_heads}"
            )
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


@dataclass
class Qwen2_5_VLVisionArgs:
    """Shape of the Qwen2.5-VL vision tower (a window-attention ViT with a 2x2 patch merger).

    Defaults are Qwen2.5-VL-7B-Instruct's.
    """

    depth: int = 32
    dim: int = 1280
    n_heads: int = 16
    hidden_dim: int = 3420
    out_dim: int = 3584
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    tokens_per_second: int = 2
    rope_theta: float = 10_000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_dim(self) -> int:
        """Values per input row of ``pixel_values``: ``in_channels * temporal_patch_size * patch_size^2``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def window_units(self) -> int:
        """Side of an attention window in merged units (2x2 patch groups): 112 px -> 4."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    def validate(self) -> None:
        """Raise ``ValueError`` when the shape is not one the tower can be built with."""
        if self.dim % self.n_heads:
            raise ValueError(f"vision_config hidden_size {self.dim} is not divisible by num_heads {self.n_heads}")
        if self.head_dim % 4:
            raise ValueError(f"vision head dim {self.head_dim} must be a multiple of 4 (2-D rotary over h and w)")
        if self.window_units < 1:
            raise ValueError(
                f"vision_config window_size {self.window_size} is smaller than one merged unit "
                f"({self.spatial_merge_size * self.patch_size} px)"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"vision_config fullatt_block_indexes {bad} are outside 0..{self.depth - 1}")


def vision_args_from_hf_config(config: dict[str, Any]) -> Qwen2_5_VLVisionArgs | None:
    """Build :class:`Qwen2_5_VLVisionArgs` from a parsed ``config.json`` (``None`` without a ``vision_config``).

    Both layouts nest the tower's fields in ``vision_config``; the published one names the
    input channels ``in_chans`` and may omit the rotary base, newer transformers writes
    ``in_channels`` and ``rope_parameters``. Missing fields take the 7B values.

    Raises:
        ValueError: for an activation or rotary type the native tower does not implement.
    """
    vision = config.get("vision_config")
    if not vision:
        return None
    act = vision.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(
            f"vision_config hidden_act={act!r} is not supported (the native vision MLP is SwiGLU with silu)"
        )
    rope = vision.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "axial")
    if rope_type not in ("axial", "default"):
        raise ValueError(f"vision_config rope type {rope_type!r} is not supported; supported: axial")
    defaults = Qwen2_5_VLVisionArgs()
    args = Qwen2_5_VLVisionArgs(
        depth=vision.get("depth", defaults.depth),
        dim=vision.get("hidden_size", defaults.dim),
        n_heads=vision.get("num_heads", defaults.n_heads),
        hidden_dim=vision.get("intermediate_size", defaults.hidden_dim),
        out_dim=vision.get("out_hidden_size", defaults.out_dim),
        in_channels=vision.get("in_channels", vision.get("in_chans", defaults.in_channels)),
        patch_size=vision.get("patch_size", defaults.patch_size),
        temporal_patch_size=vision.get("temporal_patch_size", defaults.temporal_patch_size),
        spatial_merge_size=vision.get("spatial_merge_size", defaults.spatial_merge_size),
        window_size=vision.get("window_size", defaults.window_size),
        fullatt_block_indexes=list(vision.get("fullatt_block_indexes", defaults.fullatt_block_indexes)),
        tokens_per_second=vision.get("tokens_per_second", defaults.tokens_per_second),
        rope_theta=float(rope.get("rope_theta", vision.get("rope_theta", defaults.rope_theta))),
    )
    args.validate()
    return args
