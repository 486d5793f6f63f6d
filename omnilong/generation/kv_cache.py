"""A key/value cache for greedy decoding, attached through the model's attention ``core``.

Every decoder layer calls ``core(q, k, v, plan)`` with rotary already applied
(:mod:`omnilong.models.attention`). :func:`kv_cache` wraps each core in a
:class:`CachedAttention` for the duration of a generation, so the model code is unchanged:

* **prefill** (``cache.decoding`` false): the wrapped core (single-device attention, or ring
  attention under context parallelism) attends the prompt as in training, and the layer's
  keys/values are kept: under context parallelism each cp rank keeps its zigzag shard;
* **decode** (``cache.decoding`` true): one new token per step, the same on every cp rank.
  Each rank attends the new query to its shard of the prompt's keys (the padding that made
  the prompt shardable left out) and to the keys of the tokens generated so far, which are
  kept on every rank but attended on cp rank 0 only, so each key counts once: two calls of
  the attention entry point (:func:`omnilong.models.attention.attention_with_lse`) whose
  ``(out, lse)`` are merged, then all-gathered and merged over the cp ranks, with the ring's
  log-sum-exp rule (:func:`omnilong.parallel.ring_attention.merge`):
  ``lse = logaddexp(lse_a, lse_b); out = out_a exp(lse_a - lse) + out_b exp(lse_b - lse)``.
"""

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from omnilong.models.attention import attention_with_lse
from omnilong.models.varlen_attention import VarlenSegments, pack_tokens, unpack_tokens
from omnilong.parallel.ring_attention import merge


class KVCache:
    """What the cached cores of one model share: the phase, the cp group and how many prompt
    keys of this rank are real.

    Attributes:
        decoding: false while the prompt is prefilled, true for decode steps.
        group: the cp process group, or ``None`` on one device.
        prompt_length: how many keys at the start of each row of this rank's prompt (shard) are
            real tokens; the rest is the padding added for the zigzag layout, which ends every
            shard (positions increase along a shard). ``None``: all are.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.decoding = False
        self.prompt_length: int | None = None

    @property
    def attends_generated(self) -> bool:
        """Whether this rank attends the generated tokens' keys (cp rank 0 only, or alone)."""
        return self.group is None or dist.get_rank(self.group) == 0


class DecodePlan(NamedTuple):
    """One decode step's kernel calls: each row's new query against its real prompt keys, and
    against the generated keys (its own included); ``None`` where this rank attends none."""

    prompt: VarlenSegments | None
    generated: VarlenSegments | None


def merge_over_group(out: torch.Tensor, lse: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every cp rank's partial ``(out [N, Hq, D], lse [Hq, N])`` merged: all-gather, then the
    log-sum-exp merge, in rank order. Returns ``[N, Hq, D]`` float32, the same on every rank."""
    outs = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
    lses = [torch.empty_like(lse) for _ in outs]
    dist.all_gather(outs, out.contiguous(), group=group)
    dist.all_gather(lses, lse.contiguous(), group=group)
    merged = torch.zeros_like(out)
    merged_lse = torch.full_like(lse, float("-inf"))
    for part, part_lse in zip(outs, lses):
        merged, merged_lse = merge(merged, merged_lse, part, part_lse)
    return merged


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
        self.prompt_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # each [B * P, Hkv, D], real keys
        self.generated_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # each [B, Hkv, n, D]

    def plan(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None) -> Any:
        """The wrapped core's plan while prefilling; a :class:`DecodePlan` for a decode step
        (``input_ids [B, 1]``), from the sizes of this core's cache (every layer's are alike)."""
        if not self.cache.decoding:
            return self.inner.plan(input_ids, document_ids)
        batch, device = input_ids.shape[0], input_ids.device
        prompt = self.prompt_kv[0].shape[0] // batch
        generated = 1 + (0 if self.generated_kv is None else self.generated_kv[0].shape[2])
        segments = lambda keys: VarlenSegments.from_lengths([1] * batch, [keys] * batch, False, device)  # noqa: E731
        return DecodePlan(
            segments(prompt) if prompt else None, segments(generated) if self.cache.attends_generated else None
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Any = None) -> torch.Tensor:
        """
        Args:
            q: ``[B, Hq, T, D]`` (decode: ``T = 1``); k, v: ``[B, Hkv, T, D]``.
            plan: :meth:`plan` of the step.

        Returns:
            ``[B, Hq, T, D]`` in the dtype of ``q``.
        """
        if not self.cache.decoding:
            real = k.shape[2] if self.cache.prompt_length is None else self.cache.prompt_length
            self.prompt_kv, self.generated_kv = tuple(pack_tokens(x[:, :, :real]) for x in (k, v)), None
            return self.inner(q, k, v, plan)
        if q.shape[2] != 1:
            raise ValueError(f"a decode step takes one token per row, got {q.shape[2]}")
        if self.generated_kv is None:
            self.generated_kv = (k, v)
        else:
            self.generated_kv = tuple(torch.cat([old, new], dim=2) for old, new in zip(self.generated_kv, (k, v)))
        query = pack_tokens(q)  # [B, Hq, D]
        out = torch.zeros(query.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
        parts = ((self.prompt_kv, plan.prompt), (tuple(map(pack_tokens, self.generated_kv)), plan.generated))
        for (keys, values), segments in parts:
            if segments is not None:
                out, lse = merge(out, lse, *attention_with_lse(query, keys, values, segments))
        if self.cache.group is not None:
            out = merge_over_group(out, lse, self.cache.group)
        return unpack_tokens(out.to(q.dtype), q.shape[0])


@contextlib.contextmanager
def kv_cache(model: nn.Module, group: dist.ProcessGroup | None = None) -> Iterator[KVCache]:
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
