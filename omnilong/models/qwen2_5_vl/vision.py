"""The Qwen2.5-VL vision tower as native single-device PyTorch.

Input rows are the processor's flattened patches (``3 * 2 * 14 * 14`` values: channels,
two frames, a 14x14 patch), ordered so that every 2x2 merge group of patches is four
consecutive rows. The tower embeds each patch, reorders the merge groups into attention
windows, runs the blocks (window attention, or attention over each frame pair in the
``fullatt_block_indexes`` blocks), merges each 2x2 group into one LLM token and restores
the processor's order.

Attention never crosses a frame pair (temporal patch), so frames can be encoded
independently. Windows and frame pairs are varlen segments, planned once per encode and
attended through the one attention entry point (:func:`omnilong.models.attention.attention`),
never with an ``N x N`` mask.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from omnilong.models.attention import attention
from omnilong.models.blocks import FeedForward, RMSNorm
from omnilong.models.qwen2_5_vl.args import Qwen2_5_VLVisionArgs
from omnilong.models.rope import apply_rope, rope_inverse_frequencies
from omnilong.models.varlen_attention import VarlenSegments
from omnilong.models.vision_tokens import check_normalised

Grid = tuple[int, int, int]  # (frame pairs, patch rows, patch columns)

VISION_NORM_EPS = 1e-6


def patch_positions(grids: list[Grid], merge: int, device: torch.device) -> torch.Tensor:
    """(row, column) of every patch, in the processor's row order.

    Within each frame pair the 2x2 merge groups come in raster order and the four patches
    of a group in raster order; frame pairs repeat the same coordinates.

    Returns:
        ``[N, 2]`` long, ``N = sum(t * h * w)``.
    """
    out = []
    for t, h, w in grids:
        rows = torch.arange(h, device=device).view(h, 1).expand(h, w)
        cols = torch.arange(w, device=device).view(1, w).expand(h, w)
        grid = torch.stack((rows, cols), dim=-1)  # [h, w, 2]
        grid = grid.view(h // merge, merge, w // merge, merge, 2).transpose(1, 2).reshape(-1, 2)  # [h * w, 2]
        out.append(grid.repeat(t, 1))
    return torch.cat(out)


def window_order(grids: list[Grid], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """The merge groups in window-attention order, and the windows' lengths in tokens.

    Each frame pair's ``(h / merge) x (w / merge)`` grid of merge groups is cut into
    ``window x window`` tiles from the top-left (tiles at the bottom and right edges are
    partial); tiles come in raster order and so do the groups inside a tile.

    Returns:
        ``(order, lengths)``: ``order [N / merge^2]`` is the index of the merge group at each
        window-order position; ``lengths`` lists the token count of every window in order.
    """
    order, lengths, offset = [], [], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        nh, nw = -(-gh // window), -(-gw // window)
        groups = torch.arange(t * gh * gw).view(t, gh, gw) + offset
        padded = F.pad(groups, (0, nw * window - gw, 0, nh * window - gh), value=-1)  # [t, nh * window, nw * window]
        tiles = padded.view(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, window * window)
        real = tiles >= 0
        order.append(tiles[real])
        lengths += (real.sum(1) * merge**2).tolist()
        offset += t * gh * gw
    return torch.cat(order), lengths


def frame_lengths(grids: list[Grid]) -> list[int]:
    """Token count of every frame pair, in order (the full-attention segments)."""
    return [h * w for t, h, w in grids for _ in range(t)]


def vision_rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of the 2-D vision rotary embedding, in fp32.

    ``head_dim / 4`` frequencies ``theta ** (-4i / head_dim)`` rotate with the row, the same
    frequencies with the column: angles ``[row * f | column * f]``, duplicated to ``head_dim``.

    Args:
        positions: ``[N, 2]`` (row, column) per token.

    Returns:
        ``(cos, sin)``, each ``[N, head_dim]``.
    """
    inv_freq = rope_inverse_frequencies(head_dim // 2, theta, positions.device)  # [head_dim / 4]
    angles = (positions[..., None].float() * inv_freq).flatten(1)  # [N, head_dim / 2]
    angles = torch.cat((angles, angles), dim=-1)  # [N, head_dim]
    return angles.cos(), angles.sin()


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (temporal patch, patch, patch) over one patch per row: a
    matmul with the flattened kernel, which is how it is computed."""

    def __init__(self, in_channels: int, temporal_patch_size: int, patch_size: int, dim: int):
        super().__init__()
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, C * T * P * P]`` normalised patches -> ``[N, dim]``."""
        check_normalised(pixel_values)
        weight = self.proj.weight.flatten(1)  # [dim, C * T * P * P]
        return F.linear(pixel_values.to(weight.dtype), weight)


class VisionAttention(nn.Module):
    """Multi-head self-attention with a fused biased qkv projection and 2-D rotary embedding,
    attending within segments (windows or frame pairs).

    The fused weight is applied as its three ``[dim, dim]`` row blocks, so that ``q``, ``k``
    and ``v`` come out as separate contiguous ``[N, H, D]`` tensors: views of one ``[N, 3 dim]``
    output would be strided, and the CUDA flash kernel copies strided inputs, in the forward
    and again in the backward.
    """

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.wo = nn.Linear(dim, dim, bias=True)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], segments: VarlenSegments
    ) -> torch.Tensor:
        """
        Args:
            x: ``[N, dim]``.
            rope: ``(cos, sin)``, each ``[N, head_dim]`` fp32.
            segments: the attention segments (bidirectional), summing to ``N`` tokens.

        Returns:
            ``[N, dim]``.
        """
        n = x.shape[0]
        q, k, v = (
            F.linear(x, weight, bias).view(n, self.n_heads, self.head_dim)  # [N, H, D], contiguous
            for weight, bias in zip(self.qkv.weight.chunk(3), self.qkv.bias.chunk(3))
        )
        cos, sin = rope
        q, k = (
            apply_rope(t.float().transpose(0, 1)[None], cos[None], sin[None])[0].transpose(0, 1).to(x.dtype)
            for t in (q, k)
        )
        out = attention(q, k, v, segments)  # [N, H, D]
        return self.wo(out.reshape(n, -1))


class VisionBlock(nn.Module):
    """Pre-norm ViT block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(self, attention: VisionAttention, feed_forward: FeedForward, dim: int):
        super().__init__()
        self.attention = attention
        self.feed_forward = feed_forward
        self.attention_norm = RMSNorm(dim, VISION_NORM_EPS)
        self.ffn_norm = RMSNorm(dim, VISION_NORM_EPS)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], segments: VarlenSegments
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, segments)
        return h + self.feed_forward(self.ffn_norm(h))


class PatchMerger(nn.Module):
    """Each merge group of ``merge^2`` tokens -> one LLM token:
    ``w2(gelu(w1(concat(norm(x_1..x_4)))))``."""

    def __init__(self, dim: int, out_dim: int, merge: int):
        super().__init__()
        self.norm = RMSNorm(dim, VISION_NORM_EPS)
        self.w1 = nn.Linear(dim * merge**2, dim * merge**2)
        self.w2 = nn.Linear(dim * merge**2, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, dim]`` -> ``[N / merge^2, out_dim]``."""
        x = self.norm(x).view(-1, self.w1.in_features)  # [N / merge^2, dim * merge^2]
        return self.w2(F.gelu(self.w1(x)))


class VisionTransformer(nn.Module):
    """Patch embedding -> window/frame-attention blocks -> 2x2 patch merger.

    Args:
        args: tower shape.
        patch_embed: :class:`PatchEmbed`.
        layers: the :class:`VisionBlock` s.
        merger: :class:`PatchMerger`.
    """

    def __init__(self, args: Qwen2_5_VLVisionArgs, patch_embed: PatchEmbed, layers: nn.ModuleList, merger: PatchMerger):
        super().__init__()
        self.args = args
        self.patch_embed = patch_embed
        self.layers = layers
        self.merger = merger
        # How the work is spread: None encodes everything here; context parallelism
        # (:mod:`omnilong.models.qwen2_5_vl.parallelize`) sets a strategy ``split(encode, pixel_values,
        # grid_thw)`` that encodes a share of the frames on each cp rank and returns every feature.
        self.split: Callable[..., torch.Tensor] | None = None

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """See :meth:`encode`; delegated to ``self.split`` when one is set."""
        if self.split is not None:
            return self.split(self.encode, pixel_values, grid_thw)
        return self.encode(pixel_values, grid_thw)

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pixel_values: ``[N, patch_dim]`` patches of all images (or videos) in order, as the
                HF processor gives ``pixel_values`` / ``pixel_values_videos``.
            grid_thw: ``[n_items, 3]`` (frame pairs, patch rows, patch columns) per item.

        Returns:
            ``[N / merge^2, out_dim]`` one embedding per LLM token, items in order.

        Raises:
            ValueError: no grids, or the patch count or row size does not match them.
        """
        if grid_thw is None:
            raise ValueError("vision inputs need their grids (image_grid_thw / video_grid_thw)")
        args, merge = self.args, self.args.spatial_merge_size
        grids = [tuple(g) for g in grid_thw.tolist()]
        n_patches = sum(t * h * w for t, h, w in grids)
        if tuple(pixel_values.shape) != (n_patches, args.patch_dim):
            raise ValueError(
                f"pixel values of shape {tuple(pixel_values.shape)} do not match the grids {grids}: "
                f"expected ({n_patches}, {args.patch_dim})"
            )
        device = pixel_values.device
        groups, window_lengths = window_order(grids, merge, args.window_units)
        groups = groups.to(device)
        order = (groups[:, None] * merge**2 + torch.arange(merge**2, device=device)).flatten()  # [N]
        x = self.patch_embed(pixel_values)[order]  # [N, dim], window order
        windows, frames = (
            VarlenSegments.from_lengths(lengths, lengths, causal=False, device=device)
            for lengths in (window_lengths, frame_lengths(grids))
        )
        rope = vision_rope_cos_sin(patch_positions(grids, merge, device)[order], args.head_dim, args.rope_theta)
        for index, layer in enumerate(self.layers):
            x = layer(x, rope, frames if index in args.fullatt_block_indexes else windows)
        merged = self.merger(x)  # [N / merge^2, out_dim], window order
        return merged[groups.argsort()]  # processor order
