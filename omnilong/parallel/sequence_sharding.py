"""The zigzag layout of a sequence over the context-parallel (cp) ranks.

A sequence of length ``T`` (padded to a multiple of ``2 * cp``) is cut into ``2 * cp``
equal chunks; cp rank ``r`` holds chunks ``r`` and ``2 * cp - 1 - r``, in that order.
Under causal attention every rank then does the same amount of work (see
``tools/bench_cp.py``). Everything position-dependent (labels already shifted,
position ids, document ids) is computed on the full sequence, padded with
:func:`pad_batch` and sharded with :func:`shard_batch`.
"""

from collections.abc import Sequence

import torch
import torch.distributed as dist

from omnilong.constants import IGNORE_INDEX

#: Batch keys whose last dimension is the sequence; other keys pass through untouched.
SEQUENCE_KEYS = ("input_ids", "labels", "position_ids", "document_ids", "vision_token_index")


def padded_length(seq_len: int, cp: int) -> int:
    """Smallest multiple of ``2 * cp`` that is ``>= seq_len``."""
    multiple = 2 * cp
    return -(-seq_len // multiple) * multiple


def zigzag_positions(seq_len: int, rank: int, cp: int) -> torch.Tensor:
    """Global token positions held by ``rank`` under the zigzag layout.

    Args:
        seq_len: padded sequence length, a multiple of ``2 * cp``.
        rank: cp rank, ``0 <= rank < cp``.
        cp: number of cp ranks.

    Returns:
        ``[seq_len // cp]`` int64: chunk ``rank`` then chunk ``2 * cp - 1 - rank``.
    """
    chunk = _chunk_length(seq_len, cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)
    return torch.cat([first, second])


def contiguous_positions(seq_len: int, rank: int, cp: int) -> torch.Tensor:
    """Global token positions held by ``rank`` when the sequence is cut into ``cp``
    consecutive pieces (the unbalanced layout, for comparison).

    Returns:
        ``[seq_len // cp]`` int64.
    """
    piece = 2 * _chunk_length(seq_len, cp)
    return torch.arange(rank * piece, (rank + 1) * piece)


def pad_to_shardable(x: torch.Tensor, cp: int, value: float = 0, dim: int = -1) -> torch.Tensor:
    """Pad ``x`` at the end of ``dim`` to a multiple of ``2 * cp`` with ``value``."""
    seq_len = x.shape[dim]
    extra = padded_length(seq_len, cp) - seq_len
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def pad_batch(batch: dict[str, torch.Tensor], cp: int, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad the sequence tensors of a full-sequence batch to a multiple of ``2 * cp``.

    Padding is appended at the end: ``input_ids`` get ``pad_token_id``, ``labels`` get
    ``-100``, ``position_ids`` (``[B, T]`` or ``[3, B, T]``) count from 0 as a new
    document would, ``document_ids`` get a new id (the largest id plus one) so the
    padding never attends real tokens, and ``vision_token_index`` gets -1. Without ``document_ids`` causality alone keeps
    real tokens away from the padding, which comes after them.

    Args:
        batch: tensors with the sequence as last dim for the keys in ``SEQUENCE_KEYS``.
        cp: number of cp ranks.
        pad_token_id: token id used for padded ``input_ids``.

    Returns:
        A new dict; non-sequence entries are passed through.
    """
    seq_len = next(batch[key].shape[-1] for key in SEQUENCE_KEYS if key in batch)
    extra = padded_length(seq_len, cp) - seq_len
    padded = dict(batch)
    for key in SEQUENCE_KEYS:
        if key not in batch or extra == 0:
            continue
        x = batch[key]
        if key == "position_ids":
            tail = torch.arange(extra, dtype=x.dtype, device=x.device).expand(*x.shape[:-1], extra)
            padded[key] = torch.cat([x, tail], dim=-1)
        elif key == "document_ids":
            padded[key] = pad_to_shardable(x, cp, value=int(x.max()) + 1)
        elif key == "labels":
            padded[key] = pad_to_shardable(x, cp, value=IGNORE_INDEX)
        elif key == "vision_token_index":
            padded[key] = pad_to_shardable(x, cp, value=-1)
        else:
            padded[key] = pad_to_shardable(x, cp, value=pad_token_id)
    return padded


def shard_sequence(x: torch.Tensor, rank: int, cp: int, dim: int = -1) -> torch.Tensor:
    """The zigzag shard of ``x`` for ``rank``.

    Args:
        x: full tensor whose ``dim`` has padded length ``T`` (multiple of ``2 * cp``).

    Returns:
        ``x`` with ``dim`` reduced to ``T // cp``: chunk ``rank`` then ``2 * cp - 1 - rank``.
    """
    positions = zigzag_positions(x.shape[dim], rank, cp).to(x.device)
    return x.index_select(dim, positions)


def unshard_sequence(shards: Sequence[torch.Tensor], dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: the full tensor from all ranks' shards.

    Args:
        shards: one shard per cp rank, in rank order, each ``T // cp`` long on ``dim``.

    Returns:
        The full tensor, ``T`` long on ``dim``.
    """
    cp = len(shards)
    seq_len = shards[0].shape[dim] * cp
    positions = torch.cat([zigzag_positions(seq_len, r, cp) for r in range(cp)])
    stacked = torch.cat(list(shards), dim=dim)
    full = torch.empty_like(stacked)
    return full.index_copy_(dim, positions.to(stacked.device), stacked)


def shard_batch(batch: dict[str, torch.Tensor], rank: int, cp: int) -> dict[str, torch.Tensor]:
    """Shard the ``SEQUENCE_KEYS`` of a padded batch (see :func:`pad_batch`) for ``rank``.

    Returns:
        A new dict; sequence tensors are ``T // cp`` long, other entries pass through.
    """
    return {key: shard_sequence(x, rank, cp) if key in SEQUENCE_KEYS else x for key, x in batch.items()}


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = -1) -> torch.Tensor:
    """All-gather every cp rank's zigzag shard and return the full tensor on every rank.

    Args:
        x: this rank's shard, ``T // cp`` long on ``dim``.
        group: the cp process group (default: the world).

    Returns:
        The full tensor, ``T`` long on ``dim`` (no autograd through the gather).
    """
    shards = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, x.contiguous(), group=group)
    return unshard_sequence(shards, dim=dim)


def _chunk_length(seq_len: int, cp: int) -> int:
    if seq_len % (2 * cp):
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of 2 * cp = {2 * cp}; "
            "pad it first with pad_batch / pad_to_shardable"
        )
    return seq_len // (2 * cp)
