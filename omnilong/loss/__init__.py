from omnilong.loss.full_logits import FullLogitsCrossEntropy

__all__ = ["FullLogitsCrossEntropy"]
