"""Greedy generation and teacher-forced predictions of a native model, on one device or with
the prompt prefilled under context parallelism (ring attention over zigzag shards).

The prompt is a full-sequence batch of one row, as a processor gives it
(``input_ids [1, T]`` and any vision inputs: ``model(**inputs)`` works on it). Its positions
are computed on the full row by the model's rule before any context-parallel cut (Qwen2.5-VL's
M-RoPE ``[3, 1, T]`` with vision grids; otherwise, LLaVA-OneVision's 1-D RoPE included, text
positions ``[1, T]``); generated tokens continue at the prompt's largest position + 1, one
position per token (on all three M-RoPE streams: Qwen2.5-VL's served rule, text after a video
resumes past the video's largest position). Every cp rank runs the same decode steps on the
same token and gets the same logits.
"""

import contextlib
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from omnilong.generation.kv_cache import KVCache, kv_cache
from omnilong.models.vision_tokens import with_vision_token_index
from omnilong.parallel.context_parallel import shard_batch_for_cp
from omnilong.parallel.sequence_sharding import padded_length, zigzag_positions

_VISION_GRIDS = ("image_grid_thw", "video_grid_thw")


@dataclass(frozen=True)
class Generation:
    """The answer to one prompt.

    Attributes:
        tokens: generated token ids, the stop token included when one ended the answer.
        stopped_by: ``"stop_token"`` or ``"max_new_tokens"``.
        prompt_length: tokens in the prompt.
    """

    tokens: list[int]
    stopped_by: str
    prompt_length: int


def with_positions(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One prompt row ready for :func:`prefill`: ``position_ids`` added (M-RoPE ``[3, 1, T]`` by
    the model's rule when there are vision grids, else ``[1, T]`` text positions ``0..T-1``;
    kept when given), and a processor's ``attention_mask`` (all ones for one unpadded row) and
    ``mm_token_type_ids`` (used for the positions) taken out.

    Raises:
        ValueError: several rows, or padding in the attention mask.
    """
    inputs = dict(inputs)
    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError(f"generation takes one prompt at a time, got a batch of {input_ids.shape[0]} rows")
    mask = inputs.pop("attention_mask", None)
    if mask is not None and not bool(mask.all()):
        raise ValueError("the prompt's attention_mask has padding: give one unpadded prompt (padding=False)")
    token_types = inputs.pop("mm_token_type_ids", None)
    if "position_ids" in inputs:
        return inputs
    if any(key in inputs for key in _VISION_GRIDS):
        positions = model.multimodal_position_ids(
            input_ids,
            inputs.get("image_grid_thw"),
            inputs.get("video_grid_thw"),
            inputs.get("second_per_grid_ts"),
            mm_token_type_ids=token_types,
        )
    else:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    return {**inputs, "position_ids": positions}


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``[..., dim]`` final hidden states -> ``[..., vocab]`` logits with the model's output
    projection, computed in the weight's dtype and returned in float32 (the weight is gathered
    first when FSDP holds it sharded: a collective, so every rank must call this)."""
    weight = model.output.weight
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    return (hidden.to(weight.dtype) @ weight.T).float()


def _hidden_at(
    hidden: torch.Tensor, positions: Sequence[int], seq_len: int, cp_mesh: DeviceMesh | None
) -> torch.Tensor:
    """``[1, n, dim]`` hidden states at global ``positions`` of a prompt, from this rank's
    ``hidden [1, t, dim]`` (its zigzag shard of ``seq_len`` padded tokens under cp: the owner
    of each position contributes it, summed over the cp group)."""
    if cp_mesh is None:
        return hidden[:, list(positions)]
    held = zigzag_positions(seq_len, cp_mesh.get_local_rank(), cp_mesh.size()).tolist()
    where = {p: i for i, p in enumerate(held)}
    picked = hidden.new_zeros(hidden.shape[0], len(positions), hidden.shape[-1])
    for j, p in enumerate(positions):
        if p in where:
            picked[:, j] = hidden[:, where[p]]
    dist.all_reduce(picked, group=cp_mesh.get_group())
    return picked


def prefill(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    positions: Sequence[int],
    cache: KVCache | None = None,
    cp_mesh: DeviceMesh | None = None,
    pad_token_id: int = 0,
) -> torch.Tensor:
    """Forward of a whole prompt (this rank's zigzag shard under cp); returns the final hidden
    states ``[1, n, dim]`` at the global ``positions`` (the same on every cp rank).

    Args:
        inputs: one full-sequence row with ``position_ids`` (:func:`with_positions`).
        cache: the :func:`~omnilong.generation.kv_cache.kv_cache` state to fill, if any:
            it learns which of this rank's keys are padding.
        cp_mesh: the cp mesh the model's ring attention runs over, or ``None``.
        pad_token_id: the token that pads the prompt to a multiple of ``2 * cp``.
    """
    seq_len = inputs["input_ids"].shape[1]
    if cp_mesh is not None:
        inputs = shard_batch_for_cp(with_vision_token_index(inputs, model.vision_token_ids), cp_mesh, pad_token_id)
        padded = padded_length(seq_len, cp_mesh.size())
        if cache is not None:
            held = zigzag_positions(padded, cp_mesh.get_local_rank(), cp_mesh.size())  # [padded / cp], on the host
            cache.prompt_length = int((held < seq_len).sum())
        seq_len = padded
    hidden = model(**inputs, return_hidden=True)  # [1, t, dim]
    return _hidden_at(hidden, positions, seq_len, cp_mesh)


@contextlib.contextmanager
def layers_kept_gathered(model: nn.Module) -> Iterator[None]:
    """Inside, FSDP-sharded blocks keep their parameters gathered after a forward (decode steps
    then all-gather each block once, not once per token; the price is the whole model on every
    rank); on exit they are resharded and reshard after forward again, as ``apply_fsdp`` set
    them. The root module is left as it is (FSDP never reshards it after forward)."""
    blocks = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    for block in blocks:
        block.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for block in blocks:
            block.set_reshard_after_forward(True, recurse=False)
            block.reshard()


@torch.no_grad()  # on a generator: grad mode is off only while it runs, not between steps
def cached_logits(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    cp_mesh: DeviceMesh | None = None,
    pad_token_id: int = 0,
) -> Generator[torch.Tensor, int, None]:
    """Decoding with a key/value cache, one token at a time: yields the next-token logits
    (``[vocab]`` float32, the same on every cp rank), first after prefilling the prompt, then
    after each token sent to it (``logits = steps.send(token)``). Closing it drops the cache.

    Args:
        model: a native model in eval mode (with ring attention when ``cp_mesh`` is given).
        inputs: one prompt row (``input_ids [1, T]`` and vision inputs; ``position_ids``
            computed when absent, see :func:`with_positions`).
        cp_mesh, pad_token_id: see :func:`prefill`.
    """
    inputs = with_positions(model, inputs)
    prompt_length = inputs["input_ids"].shape[1]
    device = inputs["input_ids"].device
    position = int(inputs["position_ids"].max()) + 1  # the served rule: past the prompt's largest position
    step_shape = (*inputs["position_ids"].shape[:-1], 1)  # M-RoPE [3, 1, 1] (all streams alike) or 1-D [1, 1]
    with kv_cache(model, None if cp_mesh is None else cp_mesh.get_group()) as cache:
        hidden = prefill(model, inputs, [prompt_length - 1], cache, cp_mesh, pad_token_id)  # [1, 1, dim]
        cache.decoding = True
        with layers_kept_gathered(model):
            while True:
                token = yield output_logits(model, hidden[0, -1])
                hidden = model(
                    input_ids=torch.tensor([[token]], device=device),
                    position_ids=torch.full(step_shape, position, device=device),
                    return_hidden=True,
                )
                position += 1


def greedy_generate(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    cp_mesh: DeviceMesh | None = None,
    pad_token_id: int = 0,
) -> Generation:
    """Greedy decoding with a key/value cache (:func:`cached_logits`) until a stop token or
    ``max_new_tokens``.

    Args:
        model, inputs, cp_mesh, pad_token_id: see :func:`cached_logits`.
        max_new_tokens: the token budget of the answer.
        stop_token_ids: tokens that end the answer (e.g. EOS, end of turn).

    Raises:
        ValueError: ``max_new_tokens < 1`` or a batch of several rows.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stops, tokens = set(stop_token_ids), []
    steps = cached_logits(model, inputs, cp_mesh, pad_token_id)
    try:
        logits = next(steps)
        while True:
            tokens.append(int(logits.argmax()))
            if tokens[-1] in stops or len(tokens) == max_new_tokens:
                break
            logits = steps.send(tokens[-1])
    finally:
        steps.close()
    return Generation(tokens, "stop_token" if tokens[-1] in stops else "max_new_tokens", inputs["input_ids"].shape[1])


@torch.no_grad()
def forced_predictions(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    answer_length: int,
    cp_mesh: DeviceMesh | None = None,
    pad_token_id: int = 0,
) -> list[int]:
    """Teacher forcing: the argmax prediction of each of the last ``answer_length`` tokens of
    ``inputs`` (prompt + answer), from one forward of the whole row.

    Returns:
        ``answer_length`` token ids: the answer is reproduced iff they equal its tokens.
    """
    inputs = with_positions(model, inputs)
    seq_len = inputs["input_ids"].shape[1]
    positions = list(range(seq_len - answer_length - 1, seq_len - 1))  # each predicts the next token
    hidden = prefill(model, inputs, positions, None, cp_mesh, pad_token_id)  # [1, n, dim]
    return output_logits(model, hidden[0]).argmax(-1).tolist()
