"""LLaVA-OneVision model arguments, read from a Hugging Face ``config.json``."""

from dataclasses import dataclass, field
from typing import Any

# The pinpoints of llava-onevision-qwen2-7b-ov-hf: every (height, width) in {384, 768, ..., 2304}^2.
_PINPOINTS_7B = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]


@dataclass
class LlavaOnevisionTextArgs:
    """Shape of the language model (a Qwen2 decoder, 1-D RoPE) and the multimodal settings.

    Defaults are llava-onevision-qwen2-7b-ov-hf's.
    """

    vocab_size: int = 152128
    dim: int = 3584
    n_layers: int = 28
    n_heads: int = 28
    n_kv_heads: int = 4
    hidden_dim: int = 18944
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    # Special token ids, from the config (never constants).
    image_token_id: int | None = 151646
    video_token_id: int | None = 151647
    image_grid_pinpoints: list[list[int]] = field(default_factory=lambda: [list(p) for p in _PINPOINTS_7B])
    vision_aspect_ratio: str = "anyres_max_9"
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "full"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def max_image_crops(self) -> int:
        """``N`` of ``anyres_max_N``: an image's grid features are downscaled above N crops' worth."""
        return int(self.vision_aspect_ratio.removeprefix("anyres_max_"))

    def validate(self) -> None:
        """Raise ``ValueError`` when the shape is not one the model can be built with."""
        if self.dim % self.n_heads:
            raise ValueError(f"hidden_size {self.dim} is not divisible by num_attention_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.n_heads} is not a multiple of num_key_value_heads {self.n_kv_heads}"
            )
        if not (
            self.vision_aspect_ratio.startswith("anyres_max_")
            and self.vision_aspect_ratio.removeprefix("anyres_max_").isdigit()
        ):
            raise ValueError(
                f"vision_aspect_ratio {self.vision_aspect_ratio!r} is not supported; "
                "supported: anyres_max_<N> (e.g. anyres_max_9)"
            )
        if self.vision_feature_select_strategy not in ("full", "default"):
            raise ValueError(
                f"vision_feature_select_strategy {self.vision_feature_select_strategy!r} "
                "is not supported; supported: full, default"
            )


@dataclass
class SiglipVisionArgs:
    """Shape of the SigLIP vision tower; defaults are so400m's with 26 layers kept."""

    dim: int = 1152
    n_layers: int = 26
    n_heads: int = 16
    hidden_dim: int = 4304
    image_size: int = 384
    patch_size: int = 14
    in_channels: int = 3
    norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        """Patches per side of one image: 384 / 14 -> 27."""
        return self.image_size // self.patch_size

    def validate(self) -> None:
        """Raise ``ValueError`` when the shape is not one the tower can be built with."""
        if self.dim % self.n_heads:
            raise ValueError(
                f"vision_config hidden_size {self.dim} is not divisible by num_attention_heads {self.n_heads}"
            )


def text_args_from_hf_config(config: dict[str, Any]) -> LlavaOnevisionTextArgs:
    """Build :class:`LlavaOnevisionTextArgs` from a parsed ``config.json`` (``text_config``
    nested, as the hub and transformers write it; ``rope_theta`` top-level in ``text_config``
    or in its ``rope_parameters``).

    Raises:
        ValueError: for a model type, activation, rope type, feature layer or sliding-window
            setting the native model does not implement, naming the field.
    """
    if config.get("model_type") != "llava_onevision":
        raise ValueError(f"config.json has model_type={config.get('model_type')!r}; expected 'llava_onevision'")
    text = config.get("text_config") or {}
    if text.get("model_type", "qwen2") != "qwen2":
        raise ValueError(
            f"config.json text_config.model_type={text.get('model_type')!r} is not supported; supported: qwen2"
        )
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"config.json text_config.hidden_act={text.get('hidden_act')!r} is not supported (SwiGLU with silu)"
        )
    if text.get("use_sliding_window"):
        raise ValueError(
            "config.json sets text_config.use_sliding_window=true, which the native model does not implement"
        )
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in (None, "default"):
        raise ValueError(f"config.json text_config rope type {rope_type!r} is not supported; supported: default")
    if config.get("projector_hidden_act", "gelu") != "gelu" or not config.get("multimodal_projector_bias", True):
        raise ValueError("config.json projector_hidden_act must be 'gelu' and multimodal_projector_bias true")
    layer = config.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ValueError(f"config.json vision_feature_layer={layer!r} is not supported; supported: one layer index")
    defaults = LlavaOnevisionTextArgs()
    args = LlavaOnevisionTextArgs(
        vocab_size=text.get("vocab_size", defaults.vocab_size),
        dim=text.get("hidden_size", defaults.dim),
        n_layers=text.get("num_hidden_layers", defaults.n_layers),
        n_heads=text.get("num_attention_heads", defaults.n_heads),
        n_kv_heads=text.get("num_key_value_heads") or text.get("num_attention_heads", defaults.n_heads),
        hidden_dim=text.get("intermediate_size", defaults.hidden_dim),
        norm_eps=text.get("rms_norm_eps", defaults.norm_eps),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", defaults.rope_theta))),
        tie_word_embeddings=bool(config.get("tie_word_embeddings") or text.get("tie_word_embeddings")),
        max_position_embeddings=text.get("max_position_embeddings", defaults.max_position_embeddings),
        image_token_id=config.get("image_token_index", config.get("image_token_id", defaults.image_token_id)),
        video_token_id=config.get("video_token_index", config.get("video_token_id", defaults.video_token_id)),
        image_grid_pinpoints=[list(p) for p in config.get("image_grid_pinpoints") or _PINPOINTS_7B],
        vision_aspect_ratio=config.get("vision_aspect_ratio", defaults.vision_aspect_ratio),
        vision_feature_layer=layer,
        vision_feature_select_strategy=config.get("vision_feature_select_strategy", "full"),
    )
    args.validate()
    return args


def vision_args_from_hf_config(config: dict[str, Any]) -> SiglipVisionArgs:
    """Build :class:`SiglipVisionArgs` from ``config.json``'s ``vision_config``.

    Raises:
        ValueError: a tower other than SigLIP's, an activation other than gelu (tanh), or a
            pooling head (``vision_use_head``), naming the field.
    """
    vision = config.get("vision_config") or {}
    if vision.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise ValueError(
            f"config.json vision_config.model_type={vision.get('model_type')!r} is not supported; "
            "supported: siglip_vision_model"
        )
    if vision.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(
            f"config.json vision_config.hidden_act={vision.get('hidden_act')!r} is not supported; "
            "supported: gelu_pytorch_tanh"
        )
    if vision.get("vision_use_head"):
        raise ValueError("config.json vision_config.vision_use_head=true is not supported (LLaVA uses no pooling head)")
    defaults = SiglipVisionArgs()
    args = SiglipVisionArgs(
        dim=vision.get("hidden_size", defaults.dim),
        n_layers=vision.get("num_hidden_layers", defaults.n_layers),
        n_heads=vision.get("num_attention_heads", defaults.n_heads),
        hidden_dim=vision.get("intermediate_size", defaults.hidden_dim),
        image_size=vision.get("image_size", defaults.image_size),
        patch_size=vision.get("patch_size", defaults.patch_size),
        in_channels=vision.get("num_channels", defaults.in_channels),
        norm_eps=vision.get("layer_norm_eps", defaults.norm_eps),
    )
    args.validate()
    return args
