"""Distribution for OmniLong: context parallelism (zigzag sharding, ring attention)."""

from omnilong.parallel.attention_kernels import block_attention, block_attention_backward
from omnilong.parallel.ring_attention import RingAttention, RingAttentionFunction
from omnilong.parallel.sequence_sharding import (
    IGNORE_INDEX,
    SEQUENCE_KEYS,
    contiguous_positions,
    gather_sequence,
    pad_batch,
    pad_to_shardable,
    padded_length,
    shard_batch,
    shard_sequence,
    unshard_sequence,
    zigzag_positions,
)

__all__ = [
    "IGNORE_INDEX",
    "SEQUENCE_KEYS",
    "RingAttention",
    "RingAttentionFunction",
    "block_attention",
    "block_attention_backward",
    "contiguous_positions",
    "gather_sequence",
    "pad_batch",
    "pad_to_shardable",
    "padded_length",
    "shard_batch",
    "shard_sequence",
    "unshard_sequence",
    "zigzag_positions",
]
