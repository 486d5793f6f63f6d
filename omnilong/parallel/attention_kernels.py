"""Local attention block kernels for ring attention: ``(out, lse)`` forward and its backward.

One query block attends one key/value block:

    out = softmax(q k^T / sqrt(D) [+ causal mask]) v,    lse = logsumexp(q k^T / sqrt(D) [...])

Ring attention never builds an attention mask: document boundaries are handled by
cutting blocks into per-document pieces (``ring_attention.document_pieces``), so each call
here is either causal on a diagonal piece or fully visible. The kernel is chosen by
device: CPU uses the SDPA flash op for CPU; CUDA uses flash-attn when it is installed,
else the SDPA flash op. CUDA-only code is imported lazily and never runs on CPU.

Contract of every backend, relied on by the ring merge:

* grouped-query key/value (``Hkv`` divides ``Hq``) are accepted without the caller
  repeating heads;
* ``causal=True`` means query ``i`` sees keys ``j <= i`` (top-left aligned, ``Tq == Tk``);
* ``lse`` is float32 ``[B, Hq, Tq]``; the backward takes the *merged* ``out`` and
  ``lse`` of the whole ring, so its gradients are this block's share of the total.
"""

import functools
import importlib.util

import torch


def block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query block over one key/value block.

    Args:
        q: ``[B, Hq, Tq, D]``.
        k: ``[B, Hkv, Tk, D]``.
        v: ``[B, Hkv, Tk, D]``.
        causal: key ``j`` visible to query ``i`` only if ``j <= i``.

    Returns:
        ``out [B, Hq, Tq, D]`` in ``q.dtype`` and ``lse [B, Hq, Tq]`` float32.
    """
    if q.device.type == "cuda":
        out, lse = _cuda_forward(q, k, v, causal)
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    return out, lse.float()


def block_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the ring's merged output.

    With ``P = exp(q k^T / sqrt(D) - lse)`` (causally masked when ``causal``) and
    ``delta = rowsum(dout * out)``: ``dv = P^T dout``, ``dS = P * (dout v^T - delta)``,
    ``dq = dS k / sqrt(D)``, ``dk = dS^T q / sqrt(D)`` (summed over the query heads of
    each kv head).

    Args:
        dout: ``[B, Hq, Tq, D]`` gradient of the merged output.
        q, k, v: as in :func:`block_attention`.
        out: ``[B, Hq, Tq, D]`` merged output of the whole ring (dtype of ``q``).
        lse: ``[B, Hq, Tq]`` float32 merged log-sum-exp (finite on every row).
        causal: as in :func:`block_attention`.

    Returns:
        ``dq [B, Hq, Tq, D]``, ``dk [B, Hkv, Tk, D]``, ``dv [B, Hkv, Tk, D]``.
    """
    if q.device.type == "cuda":
        return _cuda_backward(dout, q, k, v, out, lse, causal)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal)


# ---------------------------------------------------------------- CUDA only


@functools.cache
def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _cuda_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if _flash_attn_available():
        from flash_attn.flash_attn_interface import _flash_attn_forward

        # flash-attn works in [B, T, H, D].
        out, lse, _, _ = _flash_attn_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, q.shape[-1] ** -0.5,
            causal, -1, -1, 0.0, None, False)
        return out.transpose(1, 2), lse
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)
    return out, lse


def _cuda_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _flash_attn_available():
        from flash_attn.flash_attn_interface import _flash_attn_backward

        q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        dq, dk, dv = torch.empty_like(q_t), torch.empty_like(k_t), torch.empty_like(v_t)
        _flash_attn_backward(
            dout.transpose(1, 2), q_t, k_t, v_t, out.transpose(1, 2), lse.contiguous(), dq, dk, dv,
            0.0, q.shape[-1] ** -0.5, causal, -1, -1, 0.0, None, False)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    empty = torch.empty(0, device=q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse.contiguous(), empty, empty, q.shape[2], k.shape[2], 0.0, causal, empty, empty)
