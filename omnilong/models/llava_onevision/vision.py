"""The SigLIP vision tower of LLaVA-OneVision: a plain ViT over 384x384 crops, no class token.

Features are the hidden states after the configured layer (LLaVA-OneVision: the last kept,
before ``post_layernorm``); every image or frame is encoded on its own, so the crops or
frames of a batch may be encoded in any grouping (context parallelism spreads them over
ranks through ``split``).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from omnilong.models.attention import attention, row_segments
from omnilong.models.llava_onevision.args import SiglipVisionArgs
from omnilong.models.varlen_attention import VarlenSegments


class SiglipAttention(nn.Module):
    """Bidirectional multi-head self-attention with biased q/k/v/out projections, within each
    image (through the one attention entry point, :func:`omnilong.models.attention.attention`)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, dim)
        self.wv = nn.Linear(dim, dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, images: VarlenSegments) -> torch.Tensor:
        """
        Args:
            x: ``[N, L, dim]`` the tokens of ``N`` images.
            images: one bidirectional segment per image (:func:`row_segments`).

        Returns:
            ``[N, L, dim]``.
        """
        n, length, dim = x.shape
        q, k, v = (w(x).view(n * length, self.n_heads, -1) for w in (self.wq, self.wk, self.wv))  # [N * L, H, hd]
        out = attention(q, k, v, images)  # [N * L, H, head_dim]
        return self.wo(out.reshape(n, length, dim))


class SiglipMLP(nn.Module):
    """``w2(gelu_tanh(w1(x)))``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim)
        self.w2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class SiglipBlock(nn.Module):
    """Pre-LayerNorm encoder layer: ``h = x + attn(ln1(x)); out = h + mlp(ln2(h))``."""

    def __init__(self, args: SiglipVisionArgs):
        super().__init__()
        self.attention_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attention = SiglipAttention(args.dim, args.n_heads)
        self.ffn_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = SiglipMLP(args.dim, args.hidden_dim)

    def forward(self, x: torch.Tensor, images: VarlenSegments) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), images)
        return h + self.feed_forward(self.ffn_norm(h))


class SiglipVisionTower(nn.Module):
    """Patch embedding (Conv2d, stride = kernel = patch) + learnt positions -> encoder layers.

    Args:
        args: the tower's shape.
        feature_layer: which hidden state is the output, as transformers' ``vision_feature_layer``
            (0: the embeddings, ``i``: after layer ``i``, -1: after the last layer); the layers
            after it are never run.

    ``post_norm`` is the checkpoint's ``post_layernorm``: kept so that a loaded checkpoint
    exports back whole, never applied (LLaVA-OneVision takes the features before it).
    """

    def __init__(self, args: SiglipVisionArgs, feature_layer: int = -1):
        super().__init__()
        args.validate()
        if not -(args.n_layers + 1) <= feature_layer <= args.n_layers:
            raise ValueError(
                f"vision_feature_layer {feature_layer} is outside the tower's {args.n_layers + 1} hidden states"
            )
        self.args = args
        self.n_run = feature_layer % (args.n_layers + 1)  # layers run to reach the feature layer
        self.patch_embed = nn.Conv2d(args.in_channels, args.dim, kernel_size=args.patch_size, stride=args.patch_size)
        self.pos_embed = nn.Embedding(args.grid**2, args.dim)
        self.layers = nn.ModuleList(SiglipBlock(args) for _ in range(args.n_layers))
        self.post_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        # How the work is spread: None encodes everything here; context parallelism
        # (:mod:`omnilong.models.llava_onevision.parallelize`) sets a strategy ``split(encode, images, counts)``
        # that encodes a share of the images on each rank and returns all the features.
        self.split: Callable[..., torch.Tensor] | None = None

    def forward(self, images: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
        """See :meth:`encode`; delegated to ``self.split`` when one is set, with ``counts``, the
        frames of each video when ``images`` are videos' frames (the split deals each video's)."""
        if self.split is not None:
            return self.split(self.encode, images, counts)
        return self.encode(images)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """
        Args:
            images: ``[N, C, image_size, image_size]`` crops or frames (processor layout).

        Returns:
            ``[N, grid^2, dim]`` features of each, patches in row-major order.
        """
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype))  # [N, dim, grid, grid]
        x = x.flatten(2).transpose(1, 2) + self.pos_embed.weight  # [N, grid^2, dim]
        segments = row_segments(x.shape[0], x.shape[1], causal=False, device=x.device)  # one per image, planned once
        for layer in self.layers[: self.n_run]:
            x = layer(x, segments)
        return x
