"""Rotary position embeddings: multimodal (three position streams) and its helpers."""

import torch


def rope_inverse_frequencies(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """``inv_freq[i] = theta ** (-2i / head_dim)`` for ``i < head_dim / 2``, in fp32.

    Computed on the CPU and then moved, so every device gets the same bits.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
    return (1.0 / (theta**exponents)).to(device)


def multimodal_rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of multimodal RoPE (Qwen2-VL / Qwen2.5-VL M-RoPE).

    The ``head_dim / 2`` frequencies are split into contiguous blocks of sizes
    ``mrope_section`` (e.g. ``[16, 24, 24]``): block 0 rotates with the temporal
    position, block 1 with the height position, block 2 with the width position.
    For text, all three streams are equal and this is ordinary 1-D RoPE. The angle
    table is then duplicated to ``head_dim`` (the rotate-half convention).

    Args:
        position_ids: ``[3, B, T]`` (temporal, height, width) positions, or ``[B, T]``
            for text (used for all three streams).
        head_dim: attention head dimension.
        theta: RoPE base.
        mrope_section: frequency block sizes, summing to ``head_dim / 2``.
        dtype: dtype of the returned tables (that of the activations).

    Returns:
        ``(cos, sin)``, each ``[B, T, head_dim]``.
    """
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim / 2 = {head_dim // 2}")
    if position_ids.ndim == 2:
        position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
    inv_freq = rope_inverse_frequencies(head_dim, theta, position_ids.device)
    angles = position_ids[..., None].float() * inv_freq  # [3, B, T, head_dim / 2]
    blocks = angles.split(mrope_section, dim=-1)
    angles = torch.cat([block[i % 3] for i, block in enumerate(blocks)], dim=-1)  # [B, T, head_dim / 2]
    angles = torch.cat((angles, angles), dim=-1)  # [B, T, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x [B, H, T, D]`` and tables ``[B, T, D]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin
