"""LLaVA-OneVision as native single-device PyTorch: SigLIP tower + projector + Qwen2 decoder.

Images (``anyres_max_N``) and videos become rows of projected SigLIP features that replace
the ``<image>`` / ``<video>`` tokens of the sequence (:mod:`.features`); the decoder is the
shared one of :mod:`omnilong.models.blocks` with 1-D RoPE. Parallelism is applied from
outside (:mod:`omnilong.models.llava_onevision.parallelize`).
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnilong.documents import positions_within_documents
from omnilong.models.blocks import RMSNorm
from omnilong.models.llava_onevision.args import LlavaOnevisionTextArgs
from omnilong.models.llava_onevision.features import num_crops, pack_image_features, pool_video_features
from omnilong.models.llava_onevision.vision import SiglipVisionTower
from omnilong.models.qwen2_5_vl.model import text_position_ids
from omnilong.models.rope import multimodal_rope_cos_sin
from omnilong.models.vision_tokens import check_normalised, scatter_vision_embeddings


class Projector(nn.Module):
    """``w2(gelu(w1(x)))``: vision width -> text width (exact GELU, biased linears)."""

    def __init__(self, vision_dim: int, dim: int):
        super().__init__()
        self.w1 = nn.Linear(vision_dim, dim)
        self.w2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class LlavaOnevision(nn.Module):
    """Token embedding (+ vision features) -> decoder layers -> final norm -> output projection.

    Args:
        args: language-model shape, special token ids and the multimodal settings.
        tok_embeddings: ``nn.Embedding(vocab, dim)``.
        layers: the decoder layers.
        norm: final :class:`RMSNorm`.
        output: ``nn.Linear(dim, vocab, bias=False)``; its weight is the embedding's when tied.
        visual: the SigLIP tower.
        projector: vision width -> text width.
    """

    def __init__(
        self,
        args: LlavaOnevisionTextArgs,
        tok_embeddings: nn.Embedding,
        layers: nn.ModuleList,
        norm: RMSNorm,
        output: nn.Linear,
        visual: SiglipVisionTower,
        projector: Projector,
    ):
        super().__init__()
        self.args = args
        self.visual = visual
        self.projector = projector
        self.image_newline = nn.Parameter(torch.empty(args.dim))
        self.tok_embeddings = tok_embeddings
        self.layers = layers
        self.norm = norm
        self.output = output
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def reset_parameters(self) -> None:
        nn.init.normal_(self.image_newline, std=self.args.dim**-0.5)

    # ------------------------------------------------------------ family interface
    @property
    def vision_token_ids(self) -> tuple[int | None, ...]:
        """The token ids vision features replace: ``(image, video)``."""
        return self.args.image_token_id, self.args.video_token_id

    def with_positions(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` with ``position_ids [B, T]`` of the full rows (1-D RoPE: counted from 0 in
        each document of ``document_ids``, else along the row), unchanged when it has them;
        called once per batch before any context-parallel cut."""
        if "position_ids" in batch:
            return batch
        docs = batch.get("document_ids")
        positions = (
            torch.stack([positions_within_documents(row) for row in docs])
            if docs is not None
            else text_position_ids(batch["input_ids"], batch.get("attention_mask"))
        )  # [B, T]
        return {**batch, "position_ids": positions}

    # ------------------------------------------------------------ vision features
    def _projected(self, images: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
        """``[N, C, S, S]`` crops or frames -> ``[N, grid^2, dim]`` projected features (``counts``:
        frames per video, for the tower's split; see :meth:`SiglipVisionTower.forward`)."""
        check_normalised(images)
        features = self.visual(images, counts)  # [N, grid^2, vision_dim]
        if self.args.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return self.projector(features)

    def image_features(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[n_image_tokens, dim]`` features of every image, in order.

        Args:
            pixel_values: ``[n_images, max_crops, C, S, S]`` (processor layout: each image's base
                crop then its grid crops, zero-padded to the largest count) or ``[n_crops, C, S, S]``.
            image_sizes: ``[n_images, 2]`` original ``(height, width)``.
            batch_num_images: ``[B]`` images per sample; a sample of several images takes
                each as its base crop only (as transformers does).
        """
        sizes = image_sizes.tolist()
        multi = (
            [False] * len(sizes)
            if batch_num_images is None
            else [n != 1 for n in batch_num_images.tolist() for _ in range(n)]
        )
        crops = [
            1 if m else num_crops(size, self.args.image_grid_pinpoints, self.visual.args.image_size)
            for size, m in zip(sizes, multi)
        ]
        if pixel_values.ndim == 5:
            pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, crops)])  # [n_crops, C, S, S]
        features = self._projected(pixel_values).split(crops)  # per image: [crops, grid^2, dim]
        return torch.cat(
            [
                pack_image_features(
                    f,
                    size,
                    self.image_newline,
                    self.args.image_grid_pinpoints,
                    self.visual.args.image_size,
                    self.args.max_image_crops,
                )
                for f, size in zip(features, sizes)
            ]
        )

    def video_features(
        self, pixel_values_videos: torch.Tensor, video_num_frames: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[sum_v (frames_v * pooled^2 + 1), dim]``: every frame through the tower on its own,
        pooled, frames of a video in order and one newline after each video.

        Args:
            pixel_values_videos: ``[n_videos, frames, C, S, S]`` (the processor's layout) or
                ``[total_frames, C, S, S]`` (OmniLong's data: videos of any lengths back to back;
                under context parallelism, possibly only this cp rank's frames of each video:
                :class:`~omnilong.models.llava_onevision.parallelize.ImageSplit`).
            video_num_frames: ``[n_videos]`` frames per video, for the second layout.
        """
        if pixel_values_videos.ndim == 5:
            counts = [pixel_values_videos.shape[1]] * pixel_values_videos.shape[0]
            pixel_values_videos = pixel_values_videos.flatten(0, 1)
        elif video_num_frames is None:
            raise ValueError("pixel_values_videos of shape [total_frames, C, S, S] need video_num_frames")
        else:
            counts = video_num_frames.tolist()
        features = self._projected(pixel_values_videos, counts)  # [total_frames, grid^2, dim]
        pooled = pool_video_features(features, self.visual.args.grid)  # [total_frames, pooled^2, dim]
        newline = self.image_newline.to(pooled.dtype)[None]
        return torch.cat([row for video in pooled.split(counts) for row in (video.flatten(0, 1), newline)])

    # ------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
        *,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_num_frames: torch.Tensor | None = None,
        vision_token_index: torch.Tensor | None = None,
        **unused: Any,
    ) -> torch.Tensor:
        """Takes a transformers LLaVA-OneVision processor's whole output: ``model(**processor(...))``.

        Args:
            input_ids: ``[B, T]``; each image / video is a run of ``<image>`` / ``<video>`` tokens.
            attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding (HF convention).
            position_ids: ``[B, T]``; default counted over unmasked tokens.
            document_ids: ``[B, T]`` document index per token of a packed row; tokens attend
                only within their document.
            return_hidden: return the final hidden states instead of logits.
            pixel_values, image_sizes, batch_num_images: images (see :meth:`image_features`).
            pixel_values_videos, video_num_frames: videos (see :meth:`video_features`).
            vision_token_index: ``[B, T]`` which feature each vision token takes, for a shard of
                a sequence (see :func:`omnilong.models.vision_tokens.vision_token_index`).
            unused: other processor outputs (``image_sizes_videos``), which the model does not need.

        Returns:
            ``[B, T, vocab]`` logits, or ``[B, T, dim]`` hidden states.

        Raises:
            ValueError: vision token counts do not match the features.
        """
        unknown = set(unused) - {"image_sizes_videos"}
        if unknown:
            raise TypeError(f"LlavaOnevision.forward got unexpected arguments {sorted(unknown)}")
        h = self.tok_embeddings(input_ids)  # [B, T, dim]
        if pixel_values is not None:
            if image_sizes is None:
                raise ValueError("pixel_values need image_sizes (the processor returns both)")
            features = self.image_features(pixel_values, image_sizes, batch_num_images)
            h = scatter_vision_embeddings(h, input_ids, self.args.image_token_id, features, "image", vision_token_index)
        if pixel_values_videos is not None:
            features = self.video_features(pixel_values_videos, video_num_frames)
            h = scatter_vision_embeddings(h, input_ids, self.args.video_token_id, features, "video", vision_token_index)
        if position_ids is None:
            position_ids = text_position_ids(input_ids, attention_mask)  # [B, T]
        if attention_mask is not None and not bool(attention_mask.all()):
            docs = document_ids if document_ids is not None else torch.zeros_like(input_ids)
            document_ids = torch.where(attention_mask.bool(), docs, -1)
        rope = multimodal_rope_cos_sin(
            position_ids, self.args.head_dim, self.args.rope_theta, [self.args.head_dim // 2], h.dtype
        )  # 1-D RoPE: one stream
        attention_plan = self.layers[0].attention.core.plan(input_ids, document_ids)
        for layer in self.layers:
            h = layer(h, rope, attention_plan)
        h = self.norm(h)
        if return_hidden:
            return h
        return self.output(h)  # [B, T, vocab]
