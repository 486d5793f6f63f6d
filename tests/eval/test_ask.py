"""Asking a loaded model: a prompt longer than the model's trained positions is answered, with
a warning naming both numbers."""

import dataclasses
import logging

from omnilong.eval.ask import generate_answer, reproduces_answer
from omnilong.eval.family import Prompt


def test_a_prompt_beyond_max_positions_is_answered_with_a_warning(tiny_inference, monkeypatch, caplog):
    loaded, family = tiny_inference
    prompt = Prompt("name a module of the standard library")
    with caplog.at_level(logging.WARNING, logger="omnilong.eval.ask"):
        _, tokens = generate_answer(loaded, family, prompt, max_new_tokens=1)
    assert not caplog.records  # within the tiny model's 32768 positions

    monkeypatch.setattr(loaded.model, "args", dataclasses.replace(loaded.model.args, max_position_embeddings=8))
    with caplog.at_level(logging.WARNING, logger="omnilong.eval.ask"):
        generate_answer(loaded, family, prompt, max_new_tokens=1)
        reproduces_answer(loaded, family, prompt, "pathlib")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert warnings[0].startswith(f"the prompt has {tokens} tokens, more than the model's max_position_embeddings (8)")
