"""Reference loss: the whole ``[N, V]`` logits matrix, then ``F.cross_entropy``.

Kept for comparison with :class:`omnilong.loss.ChunkedLinearCrossEntropy`; it needs
``N * V`` floats for the logits and as many again for their gradient.
"""

import torch
import torch.nn.functional as F
from torch import nn

from omnilong.constants import IGNORE_INDEX


class FullLogitsCrossEntropy(nn.Module):
    """Cross-entropy of ``hidden @ weight.T`` computed on the full logits.

    Args:
        ignore_index: label value that contributes no loss.
        reduction: ``"mean"`` (loss averaged over non-ignored tokens; 0 when there are
            none) or ``"sum"`` (returns ``(loss_sum, num_tokens)``).
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, int]:
        """
        Args:
            hidden: ``[N, H]`` or ``[B, T, H]`` final hidden states.
            weight: ``[V, H]`` output projection.
            labels: ``[N]`` or ``[B, T]`` targets, already shifted; on any device.

        Returns:
            The mean loss, or ``(loss_sum, num_tokens)`` for ``reduction="sum"``, the count
            a host int (read back from the device: this reference does not avoid syncs).
        """
        hidden = hidden.reshape(-1, hidden.shape[-1])
        labels = labels.reshape(-1).to(hidden.device)
        logits = (hidden @ weight.t()).float()  # [N, V]
        loss_sum = F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="sum")
        num_tokens = int((labels != self.ignore_index).sum())
        if self.reduction == "sum":
            return loss_sum, num_tokens
        return loss_sum / max(num_tokens, 1)
