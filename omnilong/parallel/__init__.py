"""Distribution for OmniLong: context parallelism (zigzag sharding, ring attention)."""

from omnilong.parallel.local_ring import LocalRing, run_local_ring
from omnilong.parallel.ring_attention import (
    RingAttention,
    RingAttentionFunction,
    plan_ring,
    ring_backward,
    ring_forward,
)
from omnilong.parallel.sequence_sharding import (
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
    "SEQUENCE_KEYS",
    "LocalRing",
    "RingAttention",
    "RingAttentionFunction",
    "contiguous_positions",
    "gather_sequence",
    "pad_batch",
    "pad_to_shardable",
    "padded_length",
    "plan_ring",
    "ring_backward",
    "ring_forward",
    "run_local_ring",
    "shard_batch",
    "shard_sequence",
    "unshard_sequence",
    "zigzag_positions",
]
