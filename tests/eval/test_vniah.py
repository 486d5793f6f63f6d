"""Visual needle in a haystack with the tiny model and a generated haystack video.

Oracle for the feature cache: the same prompts with every frame pair encoded anew
(no cache); tolerance 1e-5 on logits (features are reused, not recomputed: the difference is
the encoder's batch composition only)."""

import json

import torch

from omnilong.data.video import DecodedVideo, decode_video
from omnilong.eval.family import Prompt, read_image
from omnilong.eval.tiny_data import write_needle_image
from omnilong.eval.vniah import insert_needle, run_vniah
from omnilong.generation.generate import cached_logits


def test_needle_takes_a_whole_temporal_patch_at_its_depth():
    frames = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 3, 4, 4)
    needle = torch.full((3, 8, 8), 200, dtype=torch.uint8)
    for depth, index in ((0.0, 0), (0.3, 2), (0.7, 4), (1.0, 6)):  # 3 pairs: the nearest of 4 boundaries
        video, at = insert_needle(frames, needle, depth, step=2)
        assert at == index and video.shape == (8, 3, 4, 4)
        assert (video[at:at + 2] == 200).all()  # resized to the frame size, both frames of one patch
        assert torch.equal(torch.cat([video[:at], video[at + 2:]]), frames)


def _first_logits(model, family, prompt):
    steps = cached_logits(model, family.prompt_inputs(prompt)[0])
    logits = next(steps)
    steps.close()
    return logits


def test_cached_haystack_features_equal_fresh_encoding(tiny_inference, tiny_videos_dir, tmp_path):
    loaded, family = tiny_inference
    haystack = decode_video(tiny_videos_dir / "video_002.mp4", 1.0, 4)  # 3 s: frames at 0, 1, 2 s
    frames = haystack.frames[:2]
    needle = read_image(write_needle_image(tmp_path / "needle.png"))
    with family.frame_feature_cache(loaded.model) as cache:
        for depth, keys in ((0.0, ["needle", "hay0"]), (1.0, ["hay0", "needle"])):
            video, _ = insert_needle(frames, needle, depth, 2)
            prompt = Prompt("What colour?", video=DecodedVideo(video, haystack.fps))
            cache.expect(keys)
            cached = _first_logits(loaded.model, family, prompt)
            torch.testing.assert_close(cached, _first_logits(loaded.model, family, prompt), atol=1e-5, rtol=0)
        assert cache.encoded == 2 + 2 * 2  # needle and haystack pair once in all, each uncached forward both


def test_run_writes_the_frames_depth_grid(tiny_inference, tiny_videos_dir, tmp_path):
    loaded, family = tiny_inference
    needle = read_image(write_needle_image(tmp_path / "needle.png"))
    summary = run_vniah(loaded, family, tmp_path / "out", tiny_videos_dir / "video_004.mp4", needle,
                        "What colour is the odd frame?", "red", [2, 4], [0.0, 0.5, 1.0], max_new_tokens=2)
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["frames"], r["needle_frame"]) for r in records] == [(2, 0), (2, 0), (2, 2), (4, 0), (4, 2), (4, 4)]
    # The haystack is encoded once per frame count: (1 pair + needle) + (2 pairs + needle).
    assert summary["frame_steps_encoded"] == 2 + 3
    assert summary["grids"]["generation"]["rows"] == [2, 4]
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == summary
