"""Greedy generation with a key/value cache.

Oracle: the model's plain forward over prompt + generated tokens (no cache), fp32.
Tolerance: 1e-5 absolute on logits (the cache changes only the order of the sums).
Context parallelism: the same prompt prefilled under ring attention on 2 real gloo
processes (parameters FSDP-sharded over them) gives the same tokens and logits as 1 process.
Both model families: Qwen2.5-VL (M-RoPE) and LLaVA-OneVision (1-D RoPE, its vision tower's
frames and crops split over the cp ranks).
"""

import pytest
import torch
from torch.distributed.tensor import DTensor

from omnilong.data.tokenizer import load_tokenizer
from omnilong.data.video import decode_video
from omnilong.eval.family import Prompt, family_for
from omnilong.generation.generate import cached_logits, greedy_generate, with_positions
from omnilong.generation.loading import load_inference_model
from omnilong.models.hf_loading import load_hf_model


def _uncached_logits(model, inputs, tokens):
    """Next-token logits after the prompt and after each of ``tokens``, from one plain forward."""
    full = with_positions(model, inputs)
    positions = full["position_ids"]
    start = int(positions.max()) + 1
    extra = (start + torch.arange(len(tokens))).expand(*positions.shape[:-1], -1)  # [3, 1, n] or [1, n]
    with torch.no_grad():
        logits = model(
            **{
                **inputs,
                "input_ids": torch.cat([inputs["input_ids"], torch.tensor([tokens])], 1),
                "position_ids": torch.cat([positions, extra], -1),
            }
        )
    return logits[0, inputs["input_ids"].shape[1] - 1 :].float()


FAMILIES = {"qwen2_5_vl": "tiny_qwen_dir", "llava_onevision": "tiny_llava_dir"}  # model_type: checkpoint fixture


def _prompt(model_dir, tiny_videos_dir, kind, model_type="qwen2_5_vl"):
    family = family_for(model_type, load_tokenizer(model_dir), model_dir, max_frames=6)
    video = decode_video(tiny_videos_dir / "video_002.mp4", 1.0, 5) if kind == "video" else None  # odd frame count
    image = (torch.arange(3 * 40 * 60) % 251).to(torch.uint8).view(3, 40, 60)
    images = (image,) if kind == "video" else ()
    return family.prompt_inputs(Prompt("Which colour? " * 3, images, video))[0]


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("kind", ["text", "video"])
def test_cached_decoding_equals_uncached_logits(model_type, tiny_videos_dir, kind, request):
    model_dir = request.getfixturevalue(FAMILIES[model_type])
    model = load_hf_model(model_dir).eval()
    inputs = _prompt(model_dir, tiny_videos_dir, kind, model_type)
    forced = [11, 500, 7 if kind == "text" else 42, 900]  # any tokens: the cache must not care
    steps = cached_logits(model, inputs)
    cached = [next(steps)] + [steps.send(token) for token in forced]
    steps.close()
    torch.testing.assert_close(torch.stack(cached), _uncached_logits(model, inputs, forced), atol=1e-5, rtol=0)


def test_greedy_generation_stops_on_stop_token_or_budget(tiny_qwen_dir):
    model = load_hf_model(tiny_qwen_dir).eval()
    inputs = {"input_ids": torch.arange(20, 60)[None]}
    free = greedy_generate(model, inputs, 5, stop_token_ids=[])
    assert (len(free.tokens), free.stopped_by, free.prompt_length) == (5, "max_new_tokens", 40)
    reference = _uncached_logits(model, inputs, free.tokens[:-1]).argmax(-1).tolist()
    assert free.tokens == reference
    stopped = greedy_generate(model, inputs, 5, stop_token_ids=[free.tokens[2]])
    assert (stopped.tokens, stopped.stopped_by) == (free.tokens[:3], "stop_token")
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, inputs, 0, [])
    with pytest.raises(ValueError, match="one prompt at a time"):
        greedy_generate(model, {"input_ids": inputs["input_ids"].expand(2, -1)}, 5, [])
    with pytest.raises(ValueError, match="padding"):
        greedy_generate(model, {**inputs, "attention_mask": (torch.arange(40) > 2).long()[None]}, 5, [])


def _generate_on_ranks(rank, world_size, model_dir, videos_dir, model_type):
    """Greedy tokens and per-step logits of the text and the video prompt, and the video prompt's
    first logits through the family's frame feature cache (encoded, then reused)."""
    torch.manual_seed(0)
    loaded = load_inference_model(model_dir, torch.device("cpu"), torch.float32)
    results = []
    for kind in ("text", "video"):
        inputs = _prompt(model_dir, videos_dir, kind, model_type)
        assert inputs["input_ids"].shape[1] % 4, "the prompt must need zigzag padding under cp=2 (masked in decode)"
        generation = greedy_generate(loaded.model, inputs, 4, [], cp_mesh=loaded.cp_mesh)
        steps = cached_logits(loaded.model, inputs, loaded.cp_mesh)
        logits = [next(steps)] + [steps.send(t) for t in generation.tokens[:-1]]
        # FSDP blocks stay gathered between decode steps, and are sharded again afterwards.
        assert world_size == 1 or not isinstance(next(loaded.model.layers[0].parameters()), DTensor)
        steps.close()
        assert world_size == 1 or isinstance(next(loaded.model.layers[0].parameters()), DTensor)
        results.append((generation.tokens, torch.stack(logits).tolist()))  # plain lists cross processes
    family = family_for(model_type, loaded.tokenizer, model_dir)
    steps_per_video = int(
        inputs["video_grid_thw"][0, 0] if "video_grid_thw" in inputs else inputs["video_num_frames"][0]
    )  # frame pairs / frames
    with family.frame_feature_cache(loaded.model) as cache:
        for _ in range(2):
            cache.expect([("video", j) for j in range(steps_per_video)])
            steps = cached_logits(loaded.model, inputs, loaded.cp_mesh)
            results.append(([], next(steps)[None].tolist()))
            steps.close()
    return results


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generation_under_cp2_equals_cp1(model_type, tiny_videos_dir, run_distributed, request):
    model_dir = request.getfixturevalue(FAMILIES[model_type])
    one = _generate_on_ranks(0, 1, model_dir, tiny_videos_dir, model_type)
    ranks = run_distributed(_generate_on_ranks, 2, model_dir, tiny_videos_dir, model_type)
    assert len(one) == 4
    torch.testing.assert_close(torch.tensor(one[3][1]), torch.tensor(one[1][1][:1]), atol=1e-5, rtol=0)  # cache hit
    for rank in ranks:
        for (tokens, logits), (tokens1, logits1) in zip(rank, one):
            assert tokens == tokens1
            torch.testing.assert_close(torch.tensor(logits), torch.tensor(logits1), atol=1e-5, rtol=0)
