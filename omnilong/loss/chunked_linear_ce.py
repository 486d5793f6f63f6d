"""Output projection fused with cross-entropy, one chunk of logits at a time.

The forward pass computes, per chunk of trainable tokens, the fp32 logits, their
log-sum-exp, the loss and at once the gradients of hidden and weight; the chunk's logits
are then freed. Backward only scales the saved gradients. Peak extra memory is one chunk
of logits plus the fp32 weight gradient, whatever the number of tokens; the weight
gradient's fp32 buffer is allocated once and reused by every micro-batch.

Precision: the three GEMMs of a chunk (logits, hidden gradient, weight gradient) run in
the inputs' dtype with fp32 accumulation; the log-sum-exp and softmax math is fp32; the
weight gradient is accumulated over chunks in fp32. On CUDA the passes over a chunk's
logits are one compiled, fused function (:func:`_fused_softmax_cross_entropy_grad`).

FSDP2. The weight must be used unsharded:

* Output layer in the root FSDP module (how the recipe uses it): the root does not
  reshard after forward, so after ``model(..., return_hidden=True)``
  ``model.output.weight`` is the plain unsharded parameter. Its gradient accumulates in
  that parameter's ``.grad``; the backward reaches ``hidden`` (a root output), whose hook
  queues FSDP's final callback, which reduce-scatters the gradient into the sharded
  parameter and reshards. A tied embedding is the same parameter, so both gradients are
  added before that reduction.
* Weight still sharded (a DTensor: the output layer is its own FSDP unit whose forward
  never ran, or the root was set to reshard after forward): it is all-gathered through
  autograd with ``full_tensor(grad_placements=Partial)``, so the backward reduce-scatters
  the gradient into the sharded parameter's ``.grad`` as the *sum* over ranks, the
  reduction OmniLong configures FSDP with (see
  ``omnilong.parallel.fsdp.sum_gradients_across_ranks``). The gathered weight is not saved
  for backward: it is freed when the forward returns.
"""

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial

from omnilong.constants import IGNORE_INDEX

# fp32 elements in one chunk of logits (512 MiB): large enough that the three matmuls of a
# chunk run near full speed (tools/bench_loss.py, T=4096, V=152064: 0.77x the full-logits
# time with 512-token chunks, 0.84x with 256), small next to a 7B model's weight gradient (2.2 GB).
_LOGITS_BUDGET = 2**27


def auto_chunk_size(vocab_size: int) -> int:
    """The largest power of two ``C`` with ``C * vocab_size <= 2**27``, at least 1.

    A chunk of fp32 logits then takes at most 512 MiB (512 tokens for V = 152064).
    """
    return 1 << max(0, (_LOGITS_BUDGET // vocab_size).bit_length() - 1)


def softmax_cross_entropy_grad_(
    logits: torch.Tensor, labels: torch.Tensor, scale: float, z_loss: float, grad_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and logit gradient of one chunk, all math in fp32; overwrites ``logits``.

    ``lse = logsumexp(logits)``; ``loss = sum(lse - logits[y] + z_loss * lse^2)``;
    ``d loss / d logits = scale * (softmax(logits) * (1 + 2 * z_loss * lse) - onehot(y))``.
    In place, so that eager mode holds one ``[c, V]`` buffer (the CPU path).

    Args:
        logits: ``[c, V]`` float32, used as the gradient's buffer.
        labels: ``[c]`` targets.
        scale: factor of the gradient (the loss's reduction scale).
        z_loss: coefficient of ``lse^2``.
        grad_dtype: dtype of the returned gradient (the dtype of the chunk's GEMMs).

    Returns:
        ``grad [c, V]`` in ``grad_dtype`` and the fp32 scalar loss sum (unscaled).
    """
    y = labels[:, None]
    target = logits.gather(1, y)  # [c, 1]
    row_max = logits.amax(dim=1, keepdim=True)
    grad = logits.sub_(row_max).exp_()  # exp(logits - max)
    sum_exp = grad.sum(dim=1, keepdim=True)
    lse = row_max + sum_exp.log()  # [c, 1]
    loss = (lse - target + z_loss * lse.square()).sum()
    grad.mul_(scale * (1 + 2 * z_loss * lse) / sum_exp)
    grad.scatter_add_(1, y, grad.new_full(y.shape, -scale))
    return grad.to(grad_dtype), loss


def _fused_softmax_cross_entropy_grad(
    logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, z_loss: float, grad_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`softmax_cross_entropy_grad_` written without mutation, for ``torch.compile``:
    compiled, its passes over the chunk fuse into a reduction and one elementwise kernel
    that reads the fp32 logits and writes the gradient in ``grad_dtype`` (the CUDA path).
    ``scale`` is a 0-d tensor, so that a new value does not recompile."""
    row_max = logits.amax(dim=1, keepdim=True)
    exp = torch.exp(logits - row_max)
    sum_exp = exp.sum(dim=1, keepdim=True)
    lse = row_max + torch.log(sum_exp)
    loss = (lse - logits.gather(1, labels[:, None]) + z_loss * lse * lse).sum()
    onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == labels[:, None]
    grad = exp * (scale * (1 + 2 * z_loss * lse) / sum_exp) - scale * onehot
    return grad.to(grad_dtype), loss


@functools.cache
def _compiled_softmax_cross_entropy_grad() -> Callable:
    return torch.compile(_fused_softmax_cross_entropy_grad, dynamic=True)


def _logits_fp32(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``h [c, H] @ w[V, H]^T`` as fp32 ``[c, V]``: a GEMM in the inputs' dtype with fp32
    accumulation and fp32 output (on CUDA without an intermediate low-precision copy)."""
    if h.device.type == "cuda" and h.dtype != torch.float32:
        return torch.mm(h, w.t(), out_dtype=torch.float32)
    return (h @ w.t()).float()


def _add_weight_grad_(grad_weight: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
    """``grad_weight += grad_logits^T @ h``, accumulated in the fp32 ``grad_weight``: a GEMM in
    the inputs' dtype with fp32 accumulation (on CUDA written straight into the buffer)."""
    if h.device.type == "cuda" and h.dtype != torch.float32:
        torch.addmm(grad_weight, grad_logits.t(), h, out_dtype=torch.float32, out=grad_weight)
    else:
        grad_weight.addmm_(grad_logits.t().float(), h.float())


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of per-token losses of ``hidden @ weight.T``; gradients computed in forward."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor,
        chunk_size: int,
        z_loss: float,
        scale: float,
        grad_weight: torch.Tensor | None,
    ) -> torch.Tensor:
        """
        Args:
            hidden: ``[N, H]``.
            weight: ``[V, H]``, used in ``hidden``'s dtype.
            labels: ``[N]``.
            valid: ``[n]`` indices of the tokens that are not ignored.
            chunk_size: tokens per chunk.
            z_loss: coefficient of ``lse^2``.
            scale: factor on the summed loss (``1 / n`` for a mean).
            grad_weight: ``[V, H]`` fp32 buffer for the weight gradient (zeroed here), or
                ``None`` when the weight needs no gradient.

        Returns:
            The fp32 scalar ``scale * sum_i (lse_i - logit_i[y_i] + z_loss * lse_i^2)``.
        """
        w = weight.to(hidden.dtype)
        if hidden.device.type == "cuda":
            # The scale as a tensor: a Python float would be compiled in as a constant.
            chunk_grad, chunk_scale = _compiled_softmax_cross_entropy_grad(), torch.tensor(scale, device=hidden.device)
        else:
            chunk_grad, chunk_scale = softmax_cross_entropy_grad_, scale
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        if grad_weight is not None:
            grad_weight.zero_()
        for idx in valid.split(chunk_size):
            h = hidden.index_select(0, idx)  # shape: [c, H]
            grad, chunk_loss = chunk_grad(_logits_fp32(h, w), labels.index_select(0, idx), chunk_scale, z_loss, w.dtype)
            loss += chunk_loss
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, idx, grad @ w)
            if grad_weight is not None:
                _add_weight_grad_(grad_weight, grad, h)
            del grad  # free this chunk before the next one is allocated
        if grad_weight is not None:
            # A copy in the weight's dtype, or the buffer itself for an fp32 weight (the
            # caller then stops reusing it: autograd may keep it as the parameter's .grad).
            grad_weight = grad_weight.to(weight.dtype)
        ctx.grads = (grad_hidden, grad_weight)
        return loss * scale

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("ChunkedLinearCrossEntropy supports one backward per forward")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        for grad in (grad_hidden, grad_weight):
            if grad is not None:
                grad.mul_(grad_output)  # in place: no second copy of the weight gradient
        return grad_hidden, grad_weight, None, None, None, None, None, None


class ChunkedLinearCrossEntropy(nn.Module):
    """Cross-entropy of ``hidden @ weight.T`` without ever holding all the logits.

    Per non-ignored token ``i`` with logits ``l_i = weight @ hidden_i`` (fp32) and
    ``lse_i = logsumexp(l_i)``, the loss is ``lse_i - l_i[y_i] + z_loss * lse_i^2``.
    Only non-ignored tokens are computed, ``chunk_size`` of them at a time.

    Args:
        chunk_size: tokens per chunk; ``None`` picks :func:`auto_chunk_size` of V.
        ignore_index: label value that contributes no loss.
        reduction: ``"mean"`` (loss averaged over non-ignored tokens; 0 when there are
            none) or ``"sum"`` (returns ``(loss_sum, num_tokens)``).
        z_loss: coefficient of the ``lse^2`` term (0 disables it).
    """

    def __init__(
        self,
        chunk_size: int | None = None,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        z_loss: float = 0.0,
    ):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive or None, got {chunk_size}")
        self.chunk_size = chunk_size
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.z_loss = z_loss
        self._grad_weight: torch.Tensor | None = None

    def _grad_weight_buffer(self, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 weight-gradient buffer, allocated once and reused by every micro-batch.

        An fp32 weight gets the buffer itself as its gradient, so then a new one is made
        for the next call instead."""
        buffer = self._grad_weight
        if buffer is None or buffer.shape != weight.shape or buffer.device != weight.device:
            buffer = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        self._grad_weight = None if weight.dtype == torch.float32 else buffer
        return buffer

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            hidden: ``[N, H]`` or ``[B, T, H]`` final hidden states.
            weight: ``[V, H]`` output projection; may be an FSDP2-sharded DTensor.
            labels: ``[N]`` or ``[B, T]`` targets, already shifted.

        Returns:
            The fp32 mean loss, or ``(loss_sum, num_tokens)`` for ``reduction="sum"``.
        """
        hidden = hidden.reshape(-1, hidden.shape[-1])  # shape: [N, H]
        labels = labels.reshape(-1)  # shape: [N]
        valid = (labels != self.ignore_index).nonzero().squeeze(1)  # shape: [n]
        num_tokens = valid.numel()
        if isinstance(weight, DTensor):
            weight = weight.full_tensor(grad_placements=[Partial()] * weight.device_mesh.ndim)
        chunk_size = self.chunk_size or auto_chunk_size(weight.shape[0])
        scale = 1.0 if self.reduction == "sum" else 1.0 / max(num_tokens, 1)
        grad_weight = self._grad_weight_buffer(weight) if weight.requires_grad else None
        loss = _LinearCrossEntropy.apply(hidden, weight, labels, valid, chunk_size, self.z_loss, scale, grad_weight)
        if self.reduction == "sum":
            return loss, torch.tensor(num_tokens, device=labels.device)
        return loss
