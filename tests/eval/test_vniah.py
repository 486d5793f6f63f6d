"""Visual needle in a haystack with each family's tiny model and a generated haystack video.

Oracle for the feature cache: the same prompts with every encoding step (Qwen2.5-VL: frame
pair, LLaVA-OneVision: frame) encoded anew (no cache); tolerance 1e-5 on logits (features
are reused, not recomputed: the difference is the encoder's batch composition only)."""

import json

import torch

from omnilong.data.video import DecodedVideo, decode_video
from omnilong.eval.family import Prompt, read_image
from omnilong.eval.vniah import insert_needle, run_vniah
from omnilong.generation.generate import cached_logits
from omnilong.testing.tiny_eval_data import write_needle_image


def test_needle_takes_a_whole_temporal_patch_at_its_depth():
    frames = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 3, 4, 4)
    needle = torch.full((3, 8, 8), 200, dtype=torch.uint8)
    for depth, index in ((0.0, 0), (0.3, 2), (0.7, 4), (1.0, 6)):  # 3 pairs: the nearest of 4 boundaries
        video, at = insert_needle(frames, needle, depth, step=2)
        assert at == index and video.shape == (8, 3, 4, 4)
        assert (video[at : at + 2] == 200).all()  # resized to the frame size, both frames of one patch
        assert torch.equal(torch.cat([video[:at], video[at + 2 :]]), frames)


def _first_logits(model, family, prompt):
    steps = cached_logits(model, family.prompt_inputs(prompt)[0])
    logits = next(steps)
    steps.close()
    return logits


def test_cached_haystack_features_equal_fresh_encoding(family_inference, tiny_videos_dir, tmp_path):
    loaded, family = family_inference
    step = family.frames_per_step
    haystack = decode_video(tiny_videos_dir / "video_002.mp4", 1.0, 4)  # 3 s: frames at 0, 1, 2 s
    frames = haystack.frames[:2]
    hay = [f"hay{j}" for j in range(2 // step)]  # Qwen2.5-VL: one frame pair, LLaVA-OneVision: two frames
    needle = read_image(write_needle_image(tmp_path / "needle.png"))
    with family.frame_feature_cache(loaded.model) as cache:
        for depth, keys in ((0.0, ["needle", *hay]), (1.0, [*hay, "needle"])):
            video, _ = insert_needle(frames, needle, depth, step)
            prompt = Prompt("What colour?", video=DecodedVideo(video, haystack.fps))
            cache.expect(keys)
            cached = _first_logits(loaded.model, family, prompt)
            torch.testing.assert_close(cached, _first_logits(loaded.model, family, prompt), atol=1e-5, rtol=0)
        # needle and haystack steps once in all, each uncached forward all of them again
        assert cache.encoded == (1 + len(hay)) + 2 * (1 + len(hay))


def test_run_writes_the_frames_depth_grid(family_inference, tiny_videos_dir, tmp_path):
    loaded, family = family_inference
    step = family.frames_per_step
    needle = read_image(write_needle_image(tmp_path / "needle.png"))
    summary = run_vniah(
        loaded,
        family,
        tmp_path / "out",
        tiny_videos_dir / "video_004.mp4",
        needle,
        "What colour is the odd frame?",
        "red",
        [2, 4],
        [0.0, 0.5, 1.0],
        max_new_tokens=2,
    )
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    # The needle at the step boundary nearest its depth (Qwen2.5-VL: a pair boundary, 0.5 of one pair -> 0).
    middle = {2: 0, 1: 1}[step]
    assert [(r["frames"], r["needle_frame"]) for r in records] == [(2, 0), (2, middle), (2, 2), (4, 0), (4, 2), (4, 4)]
    # The haystack is encoded once per frame count: (2 frames + needle) + (4 frames + needle) in steps.
    assert summary["frame_steps_encoded"] == (2 // step + 1) + (4 // step + 1)
    assert summary["grids"]["generation"]["rows"] == [2, 4]
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == summary
