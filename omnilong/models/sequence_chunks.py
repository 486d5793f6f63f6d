"""Sequence-chunked MLP and norm: the peak memory of a decoder layer's recompute grows with
the chunk, not with the sequence.

Under activation checkpointing a layer's recompute saves every intermediate of its MLP for
the backward: at 128K tokens of Qwen2.5-VL-7B (hidden 18944) the gate and up projections,
their SiLU and product are ~5 GB each in bf16. Here the norm + MLP run per chunk of
``chunk_size`` tokens, each chunk checkpointed on its own: the layer's recompute keeps only
the chunk inputs (slices of its input), and each chunk's intermediates exist only while
that chunk is recomputed and differentiated. The cost is one more forward of the MLP per
step. Norm and MLP act on each token alone, so the result equals the unchunked one.
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def sequence_chunked(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk_size: int | None
) -> torch.Tensor:
    """``fn(x)`` computed on chunks of ``chunk_size`` tokens along dim 1, each chunk checkpointed.

    Args:
        fn: a per-token function, ``[B, t, D] -> [B, t, D']``.
        x: ``[B, T, D]``.
        chunk_size: tokens per chunk; ``None`` or ``>= T``: ``fn(x)`` unchunked.

    Returns:
        ``[B, T, D']``, equal to ``fn(x)``.
    """
    if chunk_size is None or x.shape[1] <= chunk_size:
        return fn(x)
    parts = [checkpoint(fn, part, use_reentrant=False) for part in x.split(chunk_size, dim=1)]
    return torch.cat(parts, dim=1)


def set_mlp_chunk_size(model: nn.Module, chunk_size: int | None) -> int:
    """Make every decoder layer of ``model`` (a module with an ``mlp_chunk_size`` attribute, as
    :class:`omnilong.models.blocks.DecoderLayer`) run its norm + MLP in chunks of ``chunk_size``
    tokens (``None``: whole sequences). Returns the number of layers set."""
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"mlp_chunk_size must be a positive number of tokens or null, got {chunk_size}")
    layers = [m for m in model.modules() if hasattr(m, "mlp_chunk_size")]
    for layer in layers:
        layer.mlp_chunk_size = chunk_size
    return len(layers)
