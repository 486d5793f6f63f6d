"""Qwen2.5-VL as native single-device PyTorch: vision tower + language model.

The vision tower's embeddings replace the image/video pad tokens of the sequence;
parallelism is applied from outside (:mod:`omnilong.models.qwen2_5_vl.parallelize`).
"""

from functools import partial

import torch
from torch import nn

from omnilong.models.blocks import RMSNorm
from omnilong.models.qwen2_5_vl.args import Qwen2_5_VLTextArgs
from omnilong.models.qwen2_5_vl.rope_index import rope_index, rope_index_per_document
from omnilong.models.qwen2_5_vl.vision import VisionTransformer
from omnilong.models.rope import multimodal_rope_cos_sin
from omnilong.models.vision_tokens import scatter_vision_embeddings


def text_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Text positions ``[B, T]``: ``0..T-1``, or counted over unmasked tokens when a mask is given
    (masked tokens get position 1, as transformers does)."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


class Qwen2_5_VL(nn.Module):
    """Token embedding (+ vision tower) -> decoder layers -> final norm -> untied output projection.

    Args:
        args: model shape and special token ids.
        tok_embeddings: ``nn.Embedding(vocab, dim)``.
        layers: the decoder layers.
        norm: final :class:`RMSNorm`.
        output: ``nn.Linear(dim, vocab, bias=False)``; its weight is the embedding's when tied.
        visual: the vision tower, or ``None`` for a text-only model.
    """

    def __init__(
        self,
        args: Qwen2_5_VLTextArgs,
        tok_embeddings: nn.Embedding,
        layers: nn.ModuleList,
        norm: RMSNorm,
        output: nn.Linear,
        visual: VisionTransformer | None = None,
    ):
        super().__init__()
        self.args = args
        self.visual = visual
        self.tok_embeddings = tok_embeddings
        self.layers = layers
        self.norm = norm
        self.output = output
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    # ------------------------------------------------------------ family interface
    @property
    def vision_token_ids(self) -> tuple[int | None, ...]:
        """The token ids vision features replace: ``(image, video)``."""
        return self.args.image_token_id, self.args.video_token_id

    @property
    def projector(self) -> nn.Module:
        """The module that maps vision features to the language model's width: the merger."""
        return self._vision().merger

    def with_positions(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` with ``position_ids [3, B, T]``, the M-RoPE positions of the full rows, when
        it holds vision grids and no positions (else unchanged): called once per batch, before
        any context-parallel cut. By the rule Qwen2.5-VL was trained and is served with
        (:func:`rope_index`), per document when the batch has ``document_ids`` (a packed row's
        documents each get their positions alone, from 0; so does right padding)."""
        if "position_ids" in batch or not any(key in batch for key in ("image_grid_thw", "video_grid_thw")):
            return batch
        position_ids = self.multimodal_position_ids(
            batch["input_ids"],
            batch.get("image_grid_thw"),
            batch.get("video_grid_thw"),
            batch.get("second_per_grid_ts"),
            document_ids=batch.get("document_ids"),
        )
        return {**batch, "position_ids": position_ids}

    def multimodal_position_ids(
        self,
        input_ids: torch.Tensor,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[3, B, T]`` M-RoPE positions of ``input_ids`` by the rule Qwen2.5-VL was trained and
        is served with (see :func:`rope_index`; arguments as :meth:`forward`'s).

        With ``document_ids`` (``[B, T]``, packed rows: each run of equal ids is one document,
        padding's -1 too), every document gets the positions it has alone, counted from 0
        (:func:`rope_index_per_document`)."""
        vision_args = self._vision().args
        position_ids, _ = (rope_index if document_ids is None else partial(rope_index_per_document, document_ids))(
            input_ids,
            image_grid_thw,
            video_grid_thw,
            second_per_grid_ts,
            attention_mask,
            image_token_id=self.args.image_token_id,
            video_token_id=self.args.video_token_id,
            spatial_merge_size=vision_args.spatial_merge_size,
            tokens_per_second=vision_args.tokens_per_second,
            mm_token_type_ids=mm_token_type_ids,
        )
        return position_ids

    def _vision(self) -> VisionTransformer:
        if self.visual is None:
            raise ValueError(
                "this model was built without a vision tower; build it with vision args "
                "(e.g. build_model_from_hf_config) to pass images or videos"
            )
        return self.visual

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        vision_token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Takes a transformers Qwen2.5-VL processor's whole output: ``model(**processor(...))``.

        Args:
            input_ids: ``[B, T]`` token ids; each image/video is a run of its pad token.
            attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding (HF convention);
                padding tokens are kept out of every real token's attention.
            position_ids: ``[B, T]`` text positions or ``[3, B, T]`` M-RoPE positions
                (temporal, height, width). Default: :func:`rope_index` of the sequence (the
                rule the model was trained and is served with; per document with
                ``document_ids``) when grids are given, else text positions derived from
                ``attention_mask``.
            document_ids: ``[B, T]`` document index per token of a packed row; tokens
                attend only within their document.
            return_hidden: return the final hidden states (for a loss that applies the
                output projection itself) instead of logits.
            pixel_values: ``[N_img, patch_dim]`` image patches (HF processor layout).
            image_grid_thw: ``[n_images, 3]`` patch grid per image.
            pixel_values_videos: ``[N_vid, patch_dim]`` video patches.
            video_grid_thw: ``[n_videos, 3]`` patch grid per video.
            second_per_grid_ts: ``[n_videos]`` seconds per frame pair (for positions only).
            mm_token_type_ids: ``[B, T]`` text 0 / image 1 / video 2 per token, as the
                processor returns them (for positions only; default: read from the pad tokens).
            vision_token_index: ``[B, T]`` which feature each pad token takes, for a shard of a
                sequence (see :func:`omnilong.models.vision_tokens.vision_token_index`); default: in order.

        Returns:
            ``[B, T, vocab]`` logits, or ``[B, T, dim]`` hidden states.

        Raises:
            ValueError: pad-token counts do not match the vision features, or vision inputs
                reach a model without a vision tower.
        """
        h = self.tok_embeddings(input_ids)  # [B, T, dim]
        if pixel_values is not None:
            image_embeds = self._vision()(pixel_values, image_grid_thw)  # [n_image_tokens, dim]
            h = scatter_vision_embeddings(
                h, input_ids, self.args.image_token_id, image_embeds, "image", vision_token_index
            )
        if pixel_values_videos is not None:
            video_embeds = self._vision()(pixel_values_videos, video_grid_thw)  # [n_video_tokens, dim]
            h = scatter_vision_embeddings(
                h, input_ids, self.args.video_token_id, video_embeds, "video", vision_token_index
            )

        if position_ids is None and (image_grid_thw is not None or video_grid_thw is not None):
            position_ids = self.multimodal_position_ids(
                input_ids,
                image_grid_thw,
                video_grid_thw,
                second_per_grid_ts,
                attention_mask,
                mm_token_type_ids,
                document_ids,
            )  # [3, B, T]
        elif position_ids is None:
            position_ids = text_position_ids(input_ids, attention_mask)  # [B, T]
        if attention_mask is not None and not bool(attention_mask.all()):
            docs = document_ids if document_ids is not None else torch.zeros_like(input_ids)
            document_ids = torch.where(attention_mask.bool(), docs, -1)

        rope = multimodal_rope_cos_sin(
            position_ids, self.args.head_dim, self.args.rope_theta, self.args.mrope_section, h.dtype
        )
        # Planned once per batch, shared by every layer (no host sync inside a layer).
        attention_plan = self.layers[0].attention.core.plan(input_ids, document_ids)
        for layer in self.layers:
            h = layer(h, rope, attention_plan)
        h = self.norm(h)
        if return_hidden:
            return h
        return self.output(h)  # [B, T, vocab]
