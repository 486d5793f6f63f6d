"""Builders for Qwen2.5-VL models: plain functions that return modules."""

from torch import nn

from omnilong.models.blocks import FeedForward, RMSNorm, qwen2_decoder_layers
from omnilong.models.qwen2_5_vl.args import Qwen2_5_VLTextArgs, Qwen2_5_VLVisionArgs
from omnilong.models.qwen2_5_vl.model import Qwen2_5_VL
from omnilong.models.qwen2_5_vl.vision import PatchEmbed, PatchMerger, VisionAttention, VisionBlock, VisionTransformer


def qwen2_5_vl_vision(args: Qwen2_5_VLVisionArgs) -> VisionTransformer:
    """A Qwen2.5-VL vision tower of the given shape (random init)."""
    args.validate()
    layers = nn.ModuleList(
        VisionBlock(
            attention=VisionAttention(args.dim, args.n_heads),
            feed_forward=FeedForward(args.dim, args.hidden_dim, bias=True),
            dim=args.dim,
        )
        for _ in range(args.depth)
    )
    return VisionTransformer(
        args,
        patch_embed=PatchEmbed(args.in_channels, args.temporal_patch_size, args.patch_size, args.dim),
        layers=layers,
        merger=PatchMerger(args.dim, args.out_dim, args.spatial_merge_size),
    )


def qwen2_5_vl(args: Qwen2_5_VLTextArgs, vision_args: Qwen2_5_VLVisionArgs | None = None) -> Qwen2_5_VL:
    """A Qwen2.5-VL model of the given shape (random init; build under
    ``torch.device("meta")`` to allocate nothing); text-only when ``vision_args`` is ``None``.

    Raises:
        ValueError: the vision tower's output size is not the language model's width.
    """
    args.validate()
    if vision_args is not None and vision_args.out_dim != args.dim:
        raise ValueError(f"vision out_hidden_size {vision_args.out_dim} must equal the text hidden_size {args.dim}")
    layers = qwen2_decoder_layers(
        args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.hidden_dim, args.norm_eps
    )
    return Qwen2_5_VL(
        args,
        tok_embeddings=nn.Embedding(args.vocab_size, args.dim),
        layers=layers,
        norm=RMSNorm(args.dim, args.norm_eps),
        output=nn.Linear(args.dim, args.vocab_size, bias=False),
        visual=qwen2_5_vl_vision(vision_args) if vision_args is not None else None,
    )


def qwen2_5_vl_7b() -> Qwen2_5_VL:
    """Qwen2.5-VL-7B-Instruct: language model of 28 layers, dim 3584, 28 query / 4 key-value
    heads, SwiGLU 18944, vocab 152064, rope_theta 1e6, M-RoPE sections [16, 24, 24]; vision
    tower of 32 blocks, dim 1280, 16 heads, SwiGLU 3420, full attention in blocks 7/15/23/31."""
    return qwen2_5_vl(Qwen2_5_VLTextArgs(), Qwen2_5_VLVisionArgs())
