"""FLOPs of a dry-run step, by PyTorch's FLOP formulas (``torch.utils.flop_counter``), with
causal attention counted as what the flash kernel computes (the formulas count every
query-key pair; a causal segment computes about half of them)."""

import torch
from torch._guards import active_fake_mode
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

_aten = torch.ops.aten


def visible_pairs(q_len: int, k_len: int, causal: bool) -> int:
    """Query-key pairs a segment attends: all of them, or, causal, those of the mask aligned to
    the bottom right (query ``i`` of ``q_len`` sees keys up to ``k_len - q_len + i``)."""
    if not causal:
        return q_len * k_len
    offset = k_len - q_len
    if offset >= 0:
        return q_len * offset + q_len * (q_len + 1) // 2
    return k_len * (k_len + 1) // 2


def flash_attention_flops(query: torch.Tensor, cum_seq_q: torch.Tensor, cum_seq_k: torch.Tensor, causal: bool) -> int:
    """Forward FLOPs of a varlen flash call: ``4 * heads * head_dim`` per attended pair
    (``QK^T`` and ``PV``); the backward's five GEMMs are 2.5 times that."""
    q, k = cum_seq_q.tolist(), cum_seq_k.tolist()
    pairs = sum(visible_pairs(q[i + 1] - q[i], k[i + 1] - k[i], causal) for i in range(len(q) - 1))
    _, heads, dim = query.shape
    return 4 * heads * dim * pairs


class FlopCount(TorchDispatchMode):
    """Counts the FLOPs of the ops run inside (``flops``); ops on DTensors are counted once, as
    their local ops, and DTensor's shape propagation is left out."""

    def __init__(self):
        super().__init__()
        self.flops = 0
        self._entry_mode = None

    def __enter__(self) -> "FlopCount":
        self._entry_mode = active_fake_mode()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if active_fake_mode() is not self._entry_mode:
            return out
        if func is _aten._flash_attention_forward.default and args[3] is not None:
            self.flops += flash_attention_flops(args[0], args[3], args[4], bool(args[8]))
        elif func is _aten._flash_attention_backward.default and args[6] is not None:
            self.flops += 5 * flash_attention_flops(args[1], args[6], args[7], bool(args[11])) // 2
        elif func._overloadpacket in flop_registry:
            self.flops += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out
