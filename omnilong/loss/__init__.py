from omnilong.loss.chunked_linear_ce import ChunkedLinearCrossEntropy
from omnilong.loss.full_logits import FullLogitsCrossEntropy

__all__ = ["ChunkedLinearCrossEntropy", "FullLogitsCrossEntropy"]
