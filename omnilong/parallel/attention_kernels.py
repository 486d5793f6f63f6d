"""Local attention block kernels for ring attention: ``(out, lse)`` forward and its backward.

One query block attends one key/value block:

    out = softmax(q k^T / sqrt(D) + mask) v,    lse = logsumexp(q k^T / sqrt(D) + mask)

The kernel is chosen by device. CPU uses the SDPA flash op for CPU; CUDA uses
flash-attn when it is installed (unmasked blocks), else the SDPA flash op (unmasked)
or the SDPA memory-efficient op (masked). CUDA-only code is imported lazily and
never runs on CPU.

Contract of every backend, relied on by the ring merge:

* grouped-query key/value (``Hkv`` divides ``Hq``) are accepted without the caller
  repeating heads;
* ``mask`` is an additive float mask of the query's dtype, ``0`` (visible) or
  ``-inf`` (hidden), broadcastable to ``[B, Hq, Tq, Tk]``; it already contains the
  causal part, so ``causal`` is then ``False``;
* ``causal=True`` means query ``i`` sees keys ``j <= i`` (top-left aligned, ``Tq == Tk``);
* a query row with no visible key comes back with ``out = 0`` and ``lse = -inf``, i.e.
  absent from the merge (the CPU op itself returns ``lse = 0`` there; fixed here);
* ``lse`` is float32 ``[B, Hq, Tq]``; the backward takes the *merged* ``out`` and
  ``lse`` of the whole ring, so its gradients are this block's share of the total.
"""

import functools
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query block over one key/value block.

    Args:
        q: ``[B, Hq, Tq, D]``.
        k: ``[B, Hkv, Tk, D]``.
        v: ``[B, Hkv, Tk, D]``.
        causal: key ``j`` visible to query ``i`` only if ``j <= i``.
        mask: additive ``[B, 1, Tq, Tk]`` mask (dtype of ``q``) or ``None``.

    Returns:
        ``out [B, Hq, Tq, D]`` in ``q.dtype`` and ``lse [B, Hq, Tq]`` float32, with
        ``out = 0, lse = -inf`` on rows that see no key.
    """
    _check(causal, mask)
    if q.device.type == "cuda":
        out, lse = _cuda_forward(q, k, v, causal, mask)
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask)
    if mask is None:
        return out, lse.float()
    empty = torch.isneginf(mask).all(dim=-1)  # shape: [B, 1, Tq]
    return out.masked_fill(empty[..., None], 0), lse.float().masked_fill(empty, float("-inf"))


def block_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the ring's merged output.

    With ``P = exp(q k^T / sqrt(D) + mask - lse)`` and ``delta = rowsum(dout * out)``:
    ``dv = P^T dout``, ``dS = P * (dout v^T - delta)``, ``dq = dS k / sqrt(D)``,
    ``dk = dS^T q / sqrt(D)`` (summed over the query heads of each kv head).

    Args:
        dout: ``[B, Hq, Tq, D]`` gradient of the merged output.
        q, k, v: as in :func:`block_attention`.
        out: ``[B, Hq, Tq, D]`` merged output of the whole ring (dtype of ``q``).
        lse: ``[B, Hq, Tq]`` float32 merged log-sum-exp (finite on every row).
        causal, mask: as in :func:`block_attention`.

    Returns:
        ``dq [B, Hq, Tq, D]``, ``dk [B, Hkv, Tk, D]``, ``dv [B, Hkv, Tk, D]``.
    """
    _check(causal, mask)
    if q.device.type == "cuda":
        return _cuda_backward(dout, q, k, v, out, lse, causal, mask)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask)


def _check(causal: bool, mask: Optional[torch.Tensor]) -> None:
    if causal and mask is not None:
        raise ValueError("pass either causal=True or a mask that already contains the causal part")


# ---------------------------------------------------------------- CUDA only


@functools.cache
def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _cuda_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mask: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    if mask is None and _flash_attn_available():
        from flash_attn.flash_attn_interface import _flash_attn_forward

        # flash-attn works in [B, T, H, D].
        out, lse, _, _ = _flash_attn_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, q.shape[-1] ** -0.5,
            causal, -1, -1, 0.0, None, False)
        return out.transpose(1, 2), lse
    if mask is None:
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)
        return out, lse
    # The memory-efficient op takes the mask but not grouped kv heads.
    groups = q.shape[1] // k.shape[1]
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, _repeat_kv(k, groups), _repeat_kv(v, groups), _aligned_bias(mask, q.shape[1]), True)
    return out, lse[..., : q.shape[2]]  # lse comes padded to a multiple of 32 rows


def _cuda_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    mask: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    empty = torch.empty(0, device=q.device)
    if mask is None and _flash_attn_available():
        from flash_attn.flash_attn_interface import _flash_attn_backward

        q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        dq, dk, dv = torch.empty_like(q_t), torch.empty_like(k_t), torch.empty_like(v_t)
        _flash_attn_backward(
            dout.transpose(1, 2), q_t, k_t, v_t, out.transpose(1, 2), lse.contiguous(), dq, dk, dv,
            0.0, q.shape[-1] ** -0.5, causal, -1, -1, 0.0, None, False)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    if mask is None:
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.contiguous(), empty, empty, q.shape[2], k.shape[2], 0.0, causal,
            empty, empty)
    groups = q.shape[1] // k.shape[1]
    lse = F.pad(lse, (0, -q.shape[2] % 32))
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, _repeat_kv(k, groups), _repeat_kv(v, groups), _aligned_bias(mask, q.shape[1]),
        out, lse, empty, empty, 0.0, [True, True, True, False], False)
    return dq, _sum_kv_groups(dk, groups), _sum_kv_groups(dv, groups)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, Hkv, T, D] -> [B, Hkv * groups, T, D]``, each kv head repeated ``groups`` times."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sum_kv_groups(dx: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, Hkv * groups, T, D] -> [B, Hkv, T, D]``, the gradient of :func:`_repeat_kv`."""
    return dx if groups == 1 else dx.unflatten(1, (-1, groups)).sum(2)


def _aligned_bias(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, 1, Tq, Tk] -> [B, heads, Tq, Tk]`` view whose row stride is a multiple of 16,
    as the memory-efficient kernel requires."""
    tk = mask.shape[-1]
    padded = F.pad(mask, (0, -tk % 16))[..., :tk]
    return padded.expand(mask.shape[0], heads, *mask.shape[2:])
