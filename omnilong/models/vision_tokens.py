"""Vision features in the token sequence: the pad tokens (``<|video_pad|>``, ``<video>``, ...)
that a vision tower's features replace, the same rule for every family."""

from collections.abc import Sequence

import torch

from omnilong.constants import PIXEL_KEYS


def vision_token_index(input_ids: torch.Tensor, token_ids: Sequence[int | None]) -> torch.Tensor:
    """``[B, T]`` ordinal of each vision pad token among the pad tokens of its kind in the
    batch (row-major), -1 for other tokens. Computed on the full sequence, it tells a shard
    of the sequence which vision features its pad tokens take."""
    index = torch.full_like(input_ids, -1)
    for token_id in token_ids:
        if token_id is not None:
            mask = input_ids == token_id
            index[mask] = torch.arange(int(mask.sum()), device=input_ids.device)
    return index


def with_vision_token_index(batch: dict[str, torch.Tensor], token_ids: Sequence[int | None]) -> dict[str, torch.Tensor]:
    """``batch`` with ``vision_token_index [B, T]`` (:func:`vision_token_index`) when it has vision
    inputs, else unchanged; called on a full-sequence batch before a context-parallel cut.

    Args:
        batch: a collated batch (``input_ids [B, T]``).
        token_ids: the model's ``vision_token_ids`` (``(image, video)`` pad token ids).
    """
    if not any(key in batch for key in PIXEL_KEYS):
        return batch
    return {**batch, "vision_token_index": vision_token_index(batch["input_ids"], token_ids)}


def scatter_vision_embeddings(
    h: torch.Tensor,
    input_ids: torch.Tensor,
    token_id: int | None,
    embeddings: torch.Tensor,
    kind: str,
    token_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``h`` with the rows at ``token_id`` positions replaced by vision embeddings.

    Args:
        h: ``[B, T, dim]`` token embeddings.
        input_ids: ``[B, T]``.
        token_id: the pad token id of this kind (from the config).
        embeddings: ``[n_features, dim]`` vision embeddings, items in sequence order.
        kind: ``"image"`` or ``"video"``, for the error message.
        token_index: ``[B, T]`` feature index of each pad token (:func:`vision_token_index`
            of the full sequence, sharded with it); ``None``: pad tokens take the features
            in order, one each.

    Raises:
        ValueError: the pad-token count differs from the number of embeddings.
    """
    if token_id is None:
        raise ValueError(f"the config has no {kind}_token_id, so {kind} inputs cannot be placed")
    mask = input_ids == token_id  # [B, T]
    if token_index is not None:
        return h.masked_scatter(mask.unsqueeze(-1), embeddings[token_index[mask]].to(h.dtype))
    n_tokens = int(mask.sum())
    if n_tokens != embeddings.shape[0]:
        raise ValueError(
            f"{kind} pad tokens and {kind} features do not match: {n_tokens} <|{kind}_pad|> tokens (id {token_id}) "
            f"in input_ids, {embeddings.shape[0]} features from the {kind} grids"
        )
    return h.masked_scatter(mask.unsqueeze(-1), embeddings.to(h.dtype))


def check_normalised(pixels: torch.Tensor) -> None:
    """Refuse integer pixels at a vision tower's input: datasets give uint8 pixels, which the
    recipe normalises on the device (``omnilong.data.video.normalize_pixels``); cast to the
    weights' dtype unnormalised they would train on wrong values without a sign.

    Raises:
        TypeError: ``pixels`` is not floating point.
    """
    if not pixels.is_floating_point():
        raise TypeError(
            f"the vision tower got {pixels.dtype} pixels: normalise them first "
            "(omnilong.data.video.normalize_pixels, as the recipe's _on_device does)"
        )
