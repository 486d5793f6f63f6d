"""Output projection fused with cross-entropy, one chunk of logits at a time.

The forward pass computes, per chunk of trainable tokens, the fp32 logits, their
log-sum-exp, the loss and at once the gradients of hidden and weight; the chunk's logits
are then freed. Backward only scales the saved gradients. Peak extra memory is one chunk
of logits plus the fp32 weight gradient, whatever the number of tokens; the weight
gradient's fp32 buffer is allocated once and reused by every micro-batch.

Precision: the three GEMMs of a chunk (logits, hidden gradient, weight gradient) run in
the inputs' dtype with fp32 accumulation; the log-sum-exp and softmax math is fp32; the
weight gradient is accumulated over chunks in fp32. The reduction's scale (``1 / n`` for a
mean) multiplies the loss and, in backward, the two gradients, each once.

No host sync, one compile. Only trained tokens are computed. Their positions, targets and
count are found where the labels are: labels on the host (how the recipe passes them) cost
the device nothing, and reach it in one pinned, non-blocking copy; labels on the device
cost one sync (``nonzero``) unless the caller gives their count (``num_tokens``). On the
compiled path (the default on CUDA) the passes over a chunk's logits are one
``torch.compile``'d function (:func:`_fused_softmax_cross_entropy_grad`) and every chunk
has exactly ``chunk_size`` rows: the last one is padded with rows of target ``-1``, which
add nothing to the loss or the gradients, and a call without trained tokens computes one
chunk of padding. The function thus has one shape and compiles once per dtype, at the
first call on every rank, instead of again for a ragged last chunk or for a rank with 0
or 1 trained tokens (dynamo specialises sizes 0 and 1) in the middle of a run, while the
other ranks wait at the next collective. The padding costs at most one chunk of GEMMs per
call (for Qwen2.5-VL-7B, 512 x 152064 x 3584: 1.7 TFLOP for the three).

Fake tensors (a dry run under ``FakeTensorMode``): ``torch.compile`` cannot run there, so
the compiled path's padded chunks go through the eager in-place function
(:func:`softmax_cross_entropy_grad_`), which holds the same buffers as the compiled one
(the chunk's fp32 logits and its gradient in the GEMMs' dtype). A fake tensor's trained
tokens cannot be counted: pass ``num_tokens``. Where the installed torch's fake rule for
``addmm(..., out_dtype=)`` raises a ``TypeError`` (torch 2.11; fixed later), the weight
gradient's GEMM is traced in blocks of rows (:func:`_add_weight_grad_`).

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
from torch._subclasses.fake_tensor import is_fake
from torch.distributed.tensor import DTensor, Partial

from omnilong.constants import IGNORE_INDEX
from omnilong.kernel_device import kernel_device_type

# fp32 elements in one chunk of logits (512 MiB): large enough that the three matmuls of a
# chunk run near full speed (tools/bench_loss.py, T=4096, V=152064: 0.77x the full-logits
# time with 512-token chunks, 0.84x with 256), small next to a 7B model's weight gradient (2.2 GB).
_LOGITS_BUDGET = 2**27

# Target of a padding row of the compiled path's last chunk: no loss, zero gradient.
_PADDING = -1


def auto_chunk_size(vocab_size: int) -> int:
    """The largest power of two ``C`` with ``C * vocab_size <= 2**27``, at least 1.

    A chunk of fp32 logits then takes at most 512 MiB (512 tokens for V = 152064).
    """
    return 1 << max(0, (_LOGITS_BUDGET // vocab_size).bit_length() - 1)


def softmax_cross_entropy_grad_(
    logits: torch.Tensor, targets: torch.Tensor, z_loss: float, grad_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and logit gradient of one chunk, all math in fp32; overwrites ``logits``.

    Per row with target ``y >= 0``: ``lse = logsumexp(logits)``, loss
    ``lse - logits[y] + z_loss * lse^2`` and gradient
    ``softmax(logits) * (1 + 2 * z_loss * lse) - onehot(y)``; a row with target
    :data:`_PADDING` has loss 0 and gradient 0. In place, so that eager mode holds one
    ``[c, V]`` fp32 buffer (the CPU path, and fake tensors).

    Args:
        logits: ``[c, V]`` float32, used as the gradient's buffer.
        targets: ``[c]`` target ids, or :data:`_PADDING`.
        z_loss: coefficient of ``lse^2``.
        grad_dtype: dtype of the returned gradient (the dtype of the chunk's GEMMs).

    Returns:
        ``grad [c, V]`` in ``grad_dtype`` and the fp32 scalar loss sum.
    """
    trained = (targets != _PADDING)[:, None]  # shape: [c, 1]
    y = targets.clamp(min=0)[:, None]
    target = logits.gather(1, y)  # shape: [c, 1]
    row_max = logits.amax(dim=1, keepdim=True)
    grad = logits.sub_(row_max).exp_()  # exp(logits - max)
    sum_exp = grad.sum(dim=1, keepdim=True)
    lse = row_max + sum_exp.log()  # shape: [c, 1]
    loss = torch.where(trained, lse - target + z_loss * lse.square(), 0.0).sum()
    grad.mul_(torch.where(trained, (1 + 2 * z_loss * lse) / sum_exp, 0.0))
    grad.scatter_add_(1, y, -trained.to(grad.dtype))
    return grad.to(grad_dtype), loss


def _fused_softmax_cross_entropy_grad(
    logits: torch.Tensor, targets: torch.Tensor, z_loss: float, grad_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`softmax_cross_entropy_grad_` written without mutation, for ``torch.compile``:
    compiled, its passes over the chunk fuse into a reduction and one elementwise kernel
    that reads the fp32 logits and writes the gradient in ``grad_dtype`` (the CUDA path)."""
    trained = (targets != _PADDING)[:, None]  # shape: [c, 1]
    y = targets.clamp(min=0)[:, None]
    row_max = logits.amax(dim=1, keepdim=True)
    exp = torch.exp(logits - row_max)
    sum_exp = exp.sum(dim=1, keepdim=True)
    lse = row_max + torch.log(sum_exp)
    loss = torch.where(trained, lse - logits.gather(1, y) + z_loss * lse * lse, 0.0).sum()
    onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == y
    grad = torch.where(trained, exp * ((1 + 2 * z_loss * lse) / sum_exp) - onehot.float(), 0.0)
    return grad.to(grad_dtype), loss


@functools.cache
def _compiled_softmax_cross_entropy_grad() -> Callable:
    """The fused function compiled for one shape (every chunk is padded to ``chunk_size``)."""
    return torch.compile(_fused_softmax_cross_entropy_grad, dynamic=False)


def _logits_fp32(h: torch.Tensor, w: torch.Tensor, cuda: bool) -> torch.Tensor:
    """``h [c, H] @ w[V, H]^T`` as fp32 ``[c, V]``: a GEMM in the inputs' dtype with fp32
    accumulation and fp32 output (with ``cuda``'s kernel, without an intermediate
    low-precision copy)."""
    if cuda and h.dtype != torch.float32:
        return torch.mm(h, w.t(), out_dtype=torch.float32)
    return (h @ w.t()).float()


def _fake_addmm_out_dtype_fails() -> bool:
    """Whether the installed torch traces ``addmm(..., out_dtype=)`` on fake tensors with the
    plain ``addmm`` decomposition, which takes ``out_dtype`` for ``beta`` and raises a
    ``TypeError`` (torch 2.11; later releases register a decomposition of its own)."""
    from torch._decomp import decomposition_table

    return decomposition_table.get(torch.ops.aten.addmm.dtype_out) is decomposition_table.get(
        torch.ops.aten.addmm.default
    )


def _add_weight_grad_(grad_weight: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor, cuda: bool) -> None:
    """``grad_weight += grad_logits^T @ h``, accumulated in the fp32 ``grad_weight``: a GEMM in
    the inputs' dtype with fp32 accumulation (with ``cuda``'s kernel, written straight into
    the buffer).

    Fake tensors on a torch whose fake ``addmm(..., out_dtype=)`` fails: the same product in
    blocks of rows of ``grad_weight``, each block's fp32 product no larger than the chunk's
    fp32 logits (freed by now), so that the traced memory peak is the GPU's."""
    if not cuda or h.dtype == torch.float32:
        # out= rather than addmm_: FlopCounterMode counts addmm, not addmm_
        torch.addmm(grad_weight, grad_logits.t().float(), h.float(), out=grad_weight)
    elif not (is_fake(h) and _fake_addmm_out_dtype_fails()):
        torch.addmm(grad_weight, grad_logits.t(), h, out_dtype=torch.float32, out=grad_weight)
    else:
        chunk, vocab = grad_logits.shape
        rows = max(1, chunk * vocab // h.shape[1])
        for start in range(0, vocab, rows):
            block = torch.mm(grad_logits[:, start : start + rows].t(), h, out_dtype=torch.float32)
            grad_weight[start : start + rows].add_(block)


def _trained_tokens(
    labels: torch.Tensor, ignore_index: int, device: torch.device, chunk: int | None, num_tokens: int | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Positions and targets of the tokens whose label is not ``ignore_index``, on ``device``.

    Found where ``labels`` are: on the host the device waits for nothing, and both arrays
    reach it in one copy from pinned memory that does not block the host. On the device,
    ``nonzero`` reads the count back to the host, unless ``num_tokens`` is given
    (``nonzero_static``, a fixed output size: also how fake labels are traced).

    Args:
        labels: ``[N]`` targets, on the host or on ``device``.
        ignore_index: label of an untrained token.
        device: where the positions and targets are needed.
        chunk: pad the arrays to a positive multiple of ``chunk`` (the compiled path: at
            least one chunk, so that every rank compiles at its first call, trained tokens or
            not); padding has position 0 and target :data:`_PADDING`. ``None``: no padding.
        num_tokens: ``n``, when the caller knows it (it must be exact); ``None``: counted.

    Returns:
        ``positions [m]`` and ``targets [m]`` (int64, ``m >= n``) and ``n``.
    """
    trained = labels != ignore_index
    if num_tokens is None:
        positions = trained.nonzero().squeeze(1)  # shape: [n]
    else:
        positions = torch.nonzero_static(trained, size=num_tokens).squeeze(1)
    count = positions.shape[0]
    length = count if chunk is None else max(1, -(-count // chunk)) * chunk
    pinned = labels.device.type == "cpu" and device.type == "cuda"
    staged = torch.empty((2, length), dtype=torch.long, device=labels.device, pin_memory=pinned)
    staged[0, :count] = positions
    staged[0, count:] = 0
    staged[1, :count] = labels.index_select(0, positions)
    staged[1, count:] = _PADDING
    staged = staged.to(device, non_blocking=True)
    return staged[0], staged[1], count


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of per-token losses of ``hidden @ weight.T``; gradients computed in forward."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        positions: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
        chunk_grad: Callable,
        cuda: bool,
        z_loss: float,
        scale: float,
        grad_weight: torch.Tensor | None,
    ) -> torch.Tensor:
        """
        Args:
            hidden: ``[N, H]``.
            weight: ``[V, H]``, used in ``hidden``'s dtype.
            positions: ``[m]`` rows of ``hidden`` to compute.
            targets: ``[m]`` their targets; :data:`_PADDING` adds nothing.
            chunk_size: rows per chunk.
            chunk_grad: :func:`softmax_cross_entropy_grad_` or the compiled
                :func:`_fused_softmax_cross_entropy_grad`.
            cuda: use the CUDA kernels of the GEMMs (bf16 inputs, fp32 output).
            z_loss: coefficient of ``lse^2``.
            scale: factor on the summed loss and on the gradients (``1 / n`` for a mean).
            grad_weight: ``[V, H]`` fp32 buffer for the weight gradient (zeroed here), or
                ``None`` when the weight needs no gradient.

        Returns:
            The fp32 scalar ``scale * sum_i (lse_i - logit_i[y_i] + z_loss * lse_i^2)``.
        """
        w = weight.to(hidden.dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        if grad_weight is not None:
            grad_weight.zero_()
        for start in range(0, positions.shape[0], chunk_size):
            idx = positions[start : start + chunk_size]
            h = hidden.index_select(0, idx)  # shape: [c, H]
            grad, chunk_loss = chunk_grad(
                _logits_fp32(h, w, cuda), targets[start : start + chunk_size], z_loss, w.dtype
            )
            loss += chunk_loss
            if grad_hidden is not None:
                grad_hidden.index_add_(0, idx, grad @ w)  # padding rows (at position 0) add zeros
            if grad_weight is not None:
                _add_weight_grad_(grad_weight, grad, h, cuda)
            del grad  # free this chunk before the next one is allocated
        if grad_weight is not None:
            # A copy in the weight's dtype, or the buffer itself for an fp32 weight (the
            # caller then stops reusing it: autograd may keep it as the parameter's .grad).
            grad_weight = grad_weight.to(weight.dtype)
        ctx.grads, ctx.scale = (grad_hidden, grad_weight), scale
        return loss * scale

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("ChunkedLinearCrossEntropy supports one backward per forward")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        factor = grad_output * ctx.scale  # a 0-d tensor: no host sync
        for grad in (grad_hidden, grad_weight):
            if grad is not None:
                grad.mul_(factor)  # in place: no second copy of the weight gradient
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


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
        compiled: run the chunk math compiled, on chunks padded to ``chunk_size`` (one
            graph per dtype); ``None``: on CUDA. Eager on fake tensors, with the same padding.
    """

    def __init__(
        self,
        chunk_size: int | None = None,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        z_loss: float = 0.0,
        compiled: bool | None = None,
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
        self.compiled = compiled
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
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_tokens: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, int]:
        """
        Args:
            hidden: ``[N, H]`` or ``[B, T, H]`` final hidden states.
            weight: ``[V, H]`` output projection; may be an FSDP2-sharded DTensor.
            labels: ``[N]`` or ``[B, T]`` targets, already shifted; on the host (no host
                sync) or on ``hidden``'s device (one sync, unless ``num_tokens`` is given).
            num_tokens: the number of labels that are not ``ignore_index``, if known (it must
                be exact); required for fake labels (a dry run), which cannot be counted.

        Returns:
            The fp32 mean loss, or ``(loss_sum, num_tokens)`` for ``reduction="sum"``, the
            count a host int.
        """
        if num_tokens is None and is_fake(labels):
            raise ValueError("the trained tokens of fake labels cannot be counted: pass num_tokens")
        hidden = hidden.reshape(-1, hidden.shape[-1])  # shape: [N, H]
        if isinstance(weight, DTensor):
            weight = weight.full_tensor(grad_placements=[Partial()] * weight.device_mesh.ndim)
        chunk_size = self.chunk_size or auto_chunk_size(weight.shape[0])
        cuda = kernel_device_type(hidden) == "cuda"  # a dry run's fake tensors may stand for CUDA ones
        compiled = cuda if self.compiled is None else self.compiled
        positions, targets, count = _trained_tokens(
            labels.reshape(-1), self.ignore_index, hidden.device, chunk_size if compiled else None, num_tokens
        )
        if compiled and not is_fake(hidden):
            chunk_grad = _compiled_softmax_cross_entropy_grad()
        else:
            chunk_grad = softmax_cross_entropy_grad_
        scale = 1.0 if self.reduction == "sum" else 1.0 / max(count, 1)
        grad_weight = self._grad_weight_buffer(weight) if weight.requires_grad else None
        loss = _LinearCrossEntropy.apply(
            hidden, weight, positions, targets, chunk_size, chunk_grad, cuda, self.z_loss, scale, grad_weight
        )
        if self.reduction == "sum":
            return loss, count
        return loss
