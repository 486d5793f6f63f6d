"""Builders for Qwen2.5-VL models: plain functions that return modules."""

from torch import nn

from omnilong.models.blocks import DecoderLayer, FeedForward, GroupedQueryAttention, RMSNorm
from omnilong.models.qwen2_5_vl.args import Qwen2_5_VLTextArgs
from omnilong.models.qwen2_5_vl.model import Qwen2_5_VL


def qwen2_5_vl(args: Qwen2_5_VLTextArgs) -> Qwen2_5_VL:
    """A Qwen2.5-VL model of the given shape (random init; build under
    ``torch.device("meta")`` to allocate nothing)."""
    args.validate()
    layers = nn.ModuleList(
        DecoderLayer(
            attention=GroupedQueryAttention(args.dim, args.n_heads, args.n_kv_heads, args.head_dim, qkv_bias=True),
            feed_forward=FeedForward(args.dim, args.hidden_dim),
            dim=args.dim,
            norm_eps=args.norm_eps,
        )
        for _ in range(args.n_layers)
    )
    return Qwen2_5_VL(
        args,
        tok_embeddings=nn.Embedding(args.vocab_size, args.dim),
        layers=layers,
        norm=RMSNorm(args.dim, args.norm_eps),
        output=nn.Linear(args.dim, args.vocab_size, bias=False),
    )


def qwen2_5_vl_7b() -> Qwen2_5_VL:
    """Qwen2.5-VL-7B-Instruct's language model: 28 layers, dim 3584, 28 query / 4 key-value
    heads, SwiGLU 18944, vocab 152064, rope_theta 1e6, M-RoPE sections [16, 24, 24]."""
    return qwen2_5_vl(Qwen2_5_VLTextArgs())
