"""Asking a loaded model one prompt: teacher-forced scoring and a greedy answer, through a
:class:`~omnilong.eval.family.ModelFamily` (every cp rank runs the same calls)."""

import logging

import torch

from omnilong.eval.family import ModelFamily, Prompt
from omnilong.generation.generate import forced_predictions, greedy_generate
from omnilong.generation.loading import InferenceModel

logger = logging.getLogger(__name__)


def _to_device(inputs: dict[str, torch.Tensor], loaded: InferenceModel) -> dict[str, torch.Tensor]:
    dtype = next(loaded.model.parameters()).dtype
    return {k: v.to(loaded.device, dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}


def _warn_beyond_positions(loaded: InferenceModel, inputs: dict[str, torch.Tensor]) -> None:
    """Warn (main rank) when the prompt ``input_ids [1, T]`` is longer than the positions the
    model was trained for: it is still answered, as long-context evaluations ask."""
    tokens, limit = inputs["input_ids"].shape[-1], loaded.model.args.max_position_embeddings
    if tokens > limit and loaded.is_main:
        logger.warning(
            "the prompt has %d tokens, more than the model's max_position_embeddings (%d): "
            "positions beyond it were never trained, so the answer may be unreliable",
            tokens,
            limit,
        )


def _pad_id(loaded: InferenceModel) -> int:
    return loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0


def reproduces_answer(loaded: InferenceModel, family: ModelFamily, prompt: Prompt, answer: str) -> bool:
    """Teacher forcing: whether the argmax after ``prompt`` + each answer prefix is the next
    answer token, for every token of ``answer``."""
    inputs, answer_length = family.prompt_inputs(prompt, answer)
    if answer_length == 0:
        raise ValueError("the answer to score is empty")
    _warn_beyond_positions(loaded, inputs)
    predicted = forced_predictions(
        loaded.model, _to_device(inputs, loaded), answer_length, loaded.cp_mesh, _pad_id(loaded)
    )
    return predicted == inputs["input_ids"][0, -answer_length:].tolist()


def generate_answer(
    loaded: InferenceModel, family: ModelFamily, prompt: Prompt, max_new_tokens: int
) -> tuple[str, int]:
    """The greedy answer to ``prompt`` (stop token removed, special tokens skipped) and the
    prompt's token count."""
    inputs, _ = family.prompt_inputs(prompt)
    _warn_beyond_positions(loaded, inputs)
    generation = greedy_generate(
        loaded.model, _to_device(inputs, loaded), max_new_tokens, family.stop_token_ids, loaded.cp_mesh, _pad_id(loaded)
    )
    return loaded.tokenizer.decode(generation.tokens, skip_special_tokens=True), generation.prompt_length
