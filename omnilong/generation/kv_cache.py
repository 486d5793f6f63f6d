"""A key/value cache for greedy decoding, attached through the model's attention ``core``.

Every decoder layer calls ``core(q, k, v, plan)`` with rotary already applied
(:mod:`omnilong.models.attention`). :func:`kv_cache` wraps each core in a
:class:`CachedAttention` for the duration of a generation, so the model code is unchanged:

* **prefill** (``cache.decoding`` false): the wrapped core (single-device attention, or ring
  attention under context parallelism) attends the prompt as in training, and the layer's
  keys/values are kept: under context parallelism each cp rank keeps its zigzag shard;
* **decode** (``cache.decoding`` true): one new token per step, the same on every cp rank.
  Each rank attends the new query to its shard of the prompt's keys (the padding that made
  the prompt shardable masked out) and returns ``(out, lse)``; the keys of the tokens
  generated so far are kept on every rank but attended on cp rank 0 only, so each key
  counts once. The partial results are all-gathered and merged with the ring's log-sum-exp
  rule (:func:`omnilong.parallel.ring_attention.merge`):
  ``lse = logaddexp(lse_a, lse_b); out = out_a exp(lse_a - lse) + out_b exp(lse_b - lse)``.
"""

import contextlib
import math
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from omnilong.parallel.ring_attention import merge


class KVCache:
    """What the cached cores of one model share: the phase, the cp group and which prompt keys
    of this rank are real.

    Attributes:
        decoding: false while the prompt is prefilled, true for decode steps.
        group: the cp process group, or ``None`` on one device.
        prompt_valid: ``[B, L]`` bool, the keys of this rank's prompt (shard) that are real
            tokens rather than the padding added for the zigzag layout; ``None``: all are.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group = group
        self.decoding = False
        self.prompt_valid: Optional[torch.Tensor] = None

    @property
    def attends_generated(self) -> bool:
        """Whether this rank attends the generated tokens' keys (cp rank 0 only, or alone)."""
        return self.group is None or dist.get_rank(self.group) == 0


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of new queries to earlier keys (all visible), in fp32, with its log-sum-exp.

    Args:
        q: ``[B, Hq, 1, D]`` the new token's queries.
        k, v: ``[B, Hkv, L, D]`` keys/values, ``Hq % Hkv == 0``.
        valid: ``[B, L]`` bool mask of the keys to attend, or ``None`` for all.

    Returns:
        ``out [B, Hq, 1, D]`` float32 (0 where no key is visible) and ``lse [B, Hq, 1]``
        float32 (``-inf`` there).
    """
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    qg = q.float().view(b, hkv, hq // hkv, n, d)  # [B, Hkv, G, 1, D]
    scores = torch.einsum("bhgnd,bhld->bhgnl", qg, k.float()) / math.sqrt(d)  # [B, Hkv, G, 1, L]
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, 1]
    weights = torch.exp(scores - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
    out = torch.einsum("bhgnl,bhld->bhgnd", weights, v.float())  # [B, Hkv, G, 1, D]
    return out.reshape(b, hq, n, d), lse.reshape(b, hq, n)


def merge_over_group(out: torch.Tensor, lse: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every cp rank's partial ``(out [B, Hq, 1, D], lse [B, Hq, 1])`` merged: all-gather, then
    the log-sum-exp merge, in rank order. Returns ``[B, Hq, 1, D]`` float32, the same on every rank."""
    b, hq, n, d = out.shape
    outs = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
    lses = [torch.empty_like(lse) for _ in outs]
    dist.all_gather(outs, out.contiguous(), group=group)
    dist.all_gather(lses, lse.contiguous(), group=group)
    # merge() takes packed rows: out [N, H, D], lse [H, N] with N = B * 1.
    merged = torch.zeros(b * n, hq, d, dtype=torch.float32, device=out.device)
    merged_lse = torch.full((hq, b * n), float("-inf"), dtype=torch.float32, device=out.device)
    for part, part_lse in zip(outs, lses):
        merged, merged_lse = merge(merged, merged_lse, part.transpose(1, 2).reshape(b * n, hq, d),
                                   part_lse.transpose(1, 2).reshape(b * n, hq).T)
    return merged.view(b, n, hq, d).transpose(1, 2)


class CachedAttention(nn.Module):
    """An attention core that keeps its layer's keys/values (see the module docstring).

    Args:
        inner: the core it wraps (``CausalAttention`` or ``RingAttention``), used for prefill.
        cache: the state shared by the model's cached cores.
    """

    def __init__(self, inner: nn.Module, cache: KVCache):
        super().__init__()
        self.inner = inner
        self.cache = cache
        self.prompt_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # each [B, Hkv, L, D]
        self.generated_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # each [B, Hkv, n, D]

    def plan(self, input_ids: torch.Tensor, document_ids: Optional[torch.Tensor]) -> Any:
        """The wrapped core's plan while prefilling; nothing to plan for a decode step."""
        return None if self.cache.decoding else self.inner.plan(input_ids, document_ids)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Any = None) -> torch.Tensor:
        """
        Args:
            q: ``[B, Hq, T, D]`` (decode: ``T = 1``); k, v: ``[B, Hkv, T, D]``.

        Returns:
            ``[B, Hq, T, D]`` in the dtype of ``q``.
        """
        if not self.cache.decoding:
            self.prompt_kv, self.generated_kv = (k, v), None
            return self.inner(q, k, v, plan)
        if q.shape[2] != 1:
            raise ValueError(f"a decode step takes one token per row, got {q.shape[2]}")
        if self.generated_kv is None:
            self.generated_kv = (k, v)
        else:
            self.generated_kv = tuple(torch.cat([old, new], dim=2) for old, new in zip(self.generated_kv, (k, v)))
        keys, values, valid = *self.prompt_kv, self.cache.prompt_valid
        if self.cache.attends_generated:
            keys, values = torch.cat([keys, self.generated_kv[0]], 2), torch.cat([values, self.generated_kv[1]], 2)
            if valid is not None:
                valid = torch.cat([valid, valid.new_ones(valid.shape[0], self.generated_kv[0].shape[2])], dim=1)
        out, lse = decode_attention(q, keys, values, valid)
        if self.cache.group is not None:
            out = merge_over_group(out, lse, self.cache.group)
        return out.to(q.dtype)


@contextlib.contextmanager
def kv_cache(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> Iterator[KVCache]:
    """Inside, every attention core of ``model`` is a :class:`CachedAttention` sharing the
    yielded :class:`KVCache`; the original cores (and no cached tensor) are back on exit.

    Args:
        model: a model whose attention modules have a ``core`` (after context parallelism
            was applied, if it is).
        group: the cp process group when the prompt is prefilled sharded over it.
    """
    cache = KVCache(group)
    owners = [module for module in model.modules() if isinstance(getattr(module, "core", None), nn.Module)]
    originals = [owner.core for owner in owners]
    for owner, core in zip(owners, originals):
        owner.core = CachedAttention(core, cache)
    try:
        yield cache
    finally:
        for owner, core in zip(owners, originals):
            owner.core = core
