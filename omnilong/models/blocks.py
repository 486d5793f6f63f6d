"""Decoder building blocks shared by the model families (Qwen2 language model)."""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnilong.models.attention import CausalAttention
from omnilong.models.rope import apply_rope
from omnilong.models.sequence_chunks import sequence_chunked


class RMSNorm(nn.Module):
    """RMS normalisation computed in fp32; the weight is applied after casting back.

    ``y = weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)``
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1(x)) * w3(x))``."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)  # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GroupedQueryAttention(nn.Module):
    """Self-attention with ``n_heads`` query heads sharing ``n_kv_heads`` key/value heads.

    The attention itself is delegated to ``self.core`` (see ``omnilong.models.attention``),
    which context parallelism replaces.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, qkv_bias: bool):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.core: nn.Module = CausalAttention()

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_plan: Any = None,
    ) -> torch.Tensor:
        """
        Args:
            x: ``[B, T, dim]``.
            rope: ``(cos, sin)``, each ``[B, T, head_dim]``.
            attention_plan: ``self.core.plan(input_ids, document_ids)`` of the batch, made once
                before the first layer.

        Returns:
            ``[B, T, dim]``.
        """
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.core(q, k, v, attention_plan)  # [B, Hq, T, D]
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    """Pre-norm transformer layer: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(self, attention: GroupedQueryAttention, feed_forward: FeedForward, dim: int, norm_eps: float):
        super().__init__()
        self.attention = attention
        self.feed_forward = feed_forward
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        # Tokens per chunk of norm + MLP (None: the whole sequence); see omnilong.models.sequence_chunks.
        self.mlp_chunk_size: int | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_plan: Any = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, attention_plan)
        return h + sequence_chunked(self._norm_mlp, h, self.mlp_chunk_size)

    def _norm_mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.ffn_norm(h))


def qwen2_decoder_layers(
    n_layers: int, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, hidden_dim: int, norm_eps: float
) -> nn.ModuleList:
    """``n_layers`` Qwen2 decoder layers (GQA with q/k/v biases, SwiGLU), the language model
    both Qwen2.5-VL and LLaVA-OneVision are built on."""
    return nn.ModuleList(
        DecoderLayer(
            attention=GroupedQueryAttention(dim, n_heads, n_kv_heads, head_dim, qkv_bias=True),
            feed_forward=FeedForward(dim, hidden_dim),
            dim=dim,
            norm_eps=norm_eps,
        )
        for _ in range(n_layers)
    )
