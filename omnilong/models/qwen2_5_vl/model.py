"""Qwen2.5-VL as native single-device PyTorch: the language model shell.

The vision tower plugs into this module (its embeddings replace the image/video pad
tokens); parallelism is applied from outside by ``omnilong.parallel``.
"""

from typing import Optional

import torch
from torch import nn

from omnilong.models.blocks import RMSNorm
from omnilong.models.qwen2_5_vl.args import Qwen2_5_VLTextArgs
from omnilong.models.rope import multimodal_rope_cos_sin


def text_position_ids(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Text positions ``[B, T]``: ``0..T-1``, or counted over unmasked tokens when a mask is given
    (masked tokens get position 1, as transformers does)."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


class Qwen2_5_VL(nn.Module):
    """Token embedding -> decoder layers -> final norm -> untied output projection.

    Args:
        args: model shape and special token ids.
        tok_embeddings: ``nn.Embedding(vocab, dim)``.
        layers: the decoder layers.
        norm: final :class:`RMSNorm`.
        output: ``nn.Linear(dim, vocab, bias=False)``; its weight is the embedding's when tied.
    """

    def __init__(
        self,
        args: Qwen2_5_VLTextArgs,
        tok_embeddings: nn.Embedding,
        layers: nn.ModuleList,
        norm: RMSNorm,
        output: nn.Linear,
    ):
        super().__init__()
        self.args = args
        self.tok_embeddings = tok_embeddings
        self.layers = layers
        self.norm = norm
        self.output = output
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """
        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding (HF convention);
                padding tokens are kept out of every real token's attention.
            position_ids: ``[B, T]`` text positions or ``[3, B, T]`` M-RoPE positions
                (temporal, height, width). Default: derived from ``attention_mask``.
            document_ids: ``[B, T]`` document index per token of a packed row; tokens
                attend only within their document.
            return_hidden: return the final hidden states (for a loss that applies the
                output projection itself) instead of logits.

        Returns:
            ``[B, T, vocab]`` logits, or ``[B, T, dim]`` hidden states.
        """
        if position_ids is None:
            position_ids = text_position_ids(input_ids, attention_mask)
        if attention_mask is not None and not bool(attention_mask.all()):
            docs = document_ids if document_ids is not None else torch.zeros_like(input_ids)
            document_ids = torch.where(attention_mask.bool(), docs, -1)

        h = self.tok_embeddings(input_ids)  # [B, T, dim]
        rope = multimodal_rope_cos_sin(
            position_ids, self.args.head_dim, self.args.rope_theta, self.args.mrope_section, h.dtype
        )
        for layer in self.layers:
            h = layer(h, rope, document_ids)
        h = self.norm(h)
        if return_hidden:
            return h
        return self.output(h)  # [B, T, vocab]
