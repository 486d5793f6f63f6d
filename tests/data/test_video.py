"""Stage-3 video data: decoding, Qwen2.5-VL processing (oracle: transformers'
``Qwen2VLVideoProcessor``, bit for bit), the video SFT dataset and its collation."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from omnilong.data import (
    BadSampleError,
    VideoDecodeError,
    VideoOptions,
    collate_padded,
    decode_video,
    load_tokenizer,
    process_video,
    video_sft_dataset,
)
from omnilong.data.video import (
    CLIP_MEAN,
    CLIP_STD,
    DecodedVideo,
    Patching,
    SampledVideo,
    normalize_pixels,
    num_video_tokens,
    resized_sizes,
    video_patches,
)
from omnilong.data.video_sft import QwenVideoFormat
from omnilong.hf_io import read_hf_config
from omnilong.testing.tiny_qwen2_5_vl import TINY_MAX_PIXELS, TINY_MIN_PIXELS

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_tiny_videos.py"
TINY = dict(video_min_pixels=TINY_MIN_PIXELS, video_max_pixels=TINY_MAX_PIXELS)


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_tiny_videos", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return _load_tool()


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen_dir):
    return load_tokenizer(tiny_qwen_dir)


@pytest.fixture(scope="module")
def videos(tmp_path_factory, tool) -> Path:
    """The demo data: 6 videos (2-6 s, 4-10 fps, one of 23 frames) and train.jsonl."""
    return tool.write_tiny_videos(tmp_path_factory.mktemp("videos"), count=6).parent


def _write_video(path: Path, frames: int, fps: float, height: int = 56, width: int = 84) -> Path:
    from torchcodec.encoders import VideoEncoder

    g = torch.Generator().manual_seed(frames)
    VideoEncoder(
        torch.randint(0, 256, (frames, 3, height, width), dtype=torch.uint8, generator=g), frame_rate=fps
    ).to_file(path)
    return path


def _jsonl(path: Path, samples: list) -> Path:
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def _sharegpt(video, question="<video>\nWhat colour is the square?", answer="Red."):
    return {"video": video, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


# ---------------------------------------------------------------- decoding + processing
def test_decode_samples_at_fps_and_caps_frames(videos):
    clip = decode_video(videos / "video_003.mp4", fps=1.0)  # 23 frames at 10 fps: 2.3 s
    assert clip.frames.shape == (3, 3, 56, 112) and clip.frames.dtype == torch.uint8 and clip.fps == 1.0
    capped = decode_video(videos / "video_005.mp4", fps=2.0, max_frames=4)  # 6 s
    assert capped.frames.shape[0] == 4 and capped.fps == pytest.approx(4 / 6)


@pytest.mark.parametrize(
    "name, fps, budget_tokens",
    [
        ("video_003.mp4", 1.0, None),  # odd frame count
        ("video_004.mp4", 2.0, None),
        ("video_005.mp4", 2.0, 10),
    ],
)
def test_processing_matches_transformers_bitwise(videos, tiny_qwen_dir, name, fps, budget_tokens):
    """Oracle: the tiny checkpoint's video processor (transformers), same frames and settings;
    the budget case against its ``cap_pixels_per_frame`` rule with the same total pixels."""
    from transformers import AutoVideoProcessor

    reference = AutoVideoProcessor.from_pretrained(tiny_qwen_dir, local_files_only=True, max_video_tokens=10)
    total = None if budget_tokens is None else int(budget_tokens * 28 * 28 * 0.9)
    options = VideoOptions(fps=fps, min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS, total_pixels=total)
    clip = decode_video(videos / name, fps=fps)
    ((height, width),) = resized_sizes([clip], options)
    ours = process_video(clip, height, width)
    expected = reference(videos=[clip.frames], return_tensors="pt", cap_pixels_per_frame=total is not None)
    assert torch.equal(ours["pixel_values_videos"], expected["pixel_values_videos"])
    assert torch.equal(ours["video_grid_thw"], expected["video_grid_thw"])
    assert ours["second_per_grid_ts"].tolist() == [2 / clip.fps]
    t, h, w = expected["video_grid_thw"][0].tolist()
    assert num_video_tokens(clip.frames.shape[0], height, width) == t * h * w // 4


def test_frames_resized_as_decoded_equal_the_processors_pixels(videos, tiny_qwen_dir, monkeypatch):
    """Oracle: transformers' processor on the full-size frames. Decoding resizes each batch of
    ``batch_frames`` as it comes (never asking the decoder for more at once), bit for bit."""
    from torchcodec.decoders import VideoDecoder
    from transformers import AutoVideoProcessor

    asked = []
    real = VideoDecoder.get_frames_played_at
    monkeypatch.setattr(
        VideoDecoder, "get_frames_played_at", lambda self, seconds: asked.append(len(seconds)) or real(self, seconds)
    )
    source = SampledVideo(videos / "video_003.mp4", fps=4.0)  # 23 frames at 10 fps: 10 sampled
    full = source.decode()
    size = resized_sizes([full], VideoOptions(fps=4.0, min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS))[0]
    asked.clear()
    small = source.decode(size, batch_frames=3)
    assert asked == [3, 3, 3, 1] and small.frames.shape == (10, 3, *size) and small.frames.dtype == torch.uint8
    reference = AutoVideoProcessor.from_pretrained(tiny_qwen_dir, local_files_only=True, max_video_tokens=10)
    expected = reference(videos=[full.frames], return_tensors="pt")
    assert torch.equal(process_video(small, *size)["pixel_values_videos"], expected["pixel_values_videos"])
    patches = video_patches(small, *size, chunk_frames=2)["pixel_values_videos"]  # what items carry
    assert patches.dtype == torch.uint8
    assert torch.equal(normalize_pixels(patches, CLIP_MEAN, CLIP_STD), expected["pixel_values_videos"])


def test_a_subset_of_the_sampled_frames_decodes_alone(videos):
    source = SampledVideo(videos / "video_004.mp4", fps=2.0)
    everything = source.decode((28, 56))
    assert torch.equal(source.decode((28, 56), indices=[1, 4, 5]).frames, everything.frames[[1, 4, 5]])
    assert torch.equal(
        decode_video(videos / "video_004.mp4", 2.0, size=(28, 56), indices=[0, 2]).frames, everything.frames[[0, 2]]
    )


def test_cuda_decoding_falls_back_to_the_cpu_saying_why(videos, caplog, monkeypatch):
    import omnilong.data.video as video

    monkeypatch.setattr(video, "_warned_cuda_fallback", False)
    if torch.cuda.is_available():  # a CUDA build of torchcodec without a working NVDEC says so the same way
        monkeypatch.setattr(video, "_cuda_decoding_unavailable", lambda: "torchcodec built without CUDA")
    with caplog.at_level("WARNING", logger="omnilong.data.video"):
        on_gpu = SampledVideo(videos / "video_000.mp4", decode_device="cuda").decode()
        SampledVideo(videos / "video_001.mp4", decode_device="cuda")
    assert torch.equal(on_gpu.frames, decode_video(videos / "video_000.mp4").frames)
    warnings = [r.getMessage() for r in caplog.records]
    assert (
        len(warnings) == 1 and "decode_device=cuda unavailable" in warnings[0] and "on the CPU instead" in warnings[0]
    )
    with pytest.raises(ValueError, match="decode_device must be 'cpu' or 'cuda', got 'gpu'"):
        VideoOptions(decode_device="gpu")


def test_odd_frame_count_repeats_the_last_frame(videos):
    clip = decode_video(videos / "video_003.mp4", fps=1.0)
    padded = DecodedVideo(torch.cat([clip.frames, clip.frames[-1:]]), clip.fps)
    assert torch.equal(
        process_video(clip, 56, 112)["pixel_values_videos"], process_video(padded, 56, 112)["pixel_values_videos"]
    )


def test_patching_comes_from_the_checkpoint_config(tiny_qwen_dir, tiny_llava_dir, videos):
    """The dataset cuts frames as the checkpoint's tower does (``model_config``): another patch
    size gives other grids and token counts, consistent with each other; a checkpoint of another
    family is refused, naming the component to use."""
    config = read_hf_config(tiny_qwen_dir)
    assert QwenVideoFormat.from_model_config(config).patching == Patching()  # the tiny tower is cut as the 7B's
    vision = {**config["vision_config"], "patch_size": 7}
    other = QwenVideoFormat.from_model_config({**config, "vision_config": vision})
    assert other.patching == Patching(patch=7, temporal=2, merge=2)
    clip = decode_video(videos / "video_003.mp4", fps=1.0)
    ((h, w),) = other.sizes(
        [(clip.frames.shape[0], *clip.frames.shape[-2:])], VideoOptions(min_pixels=196, max_pixels=56 * 56)
    )
    assert h % 14 == 0 and w % 14 == 0
    vision_inputs = other.process(clip, (h, w))
    t = -(-clip.frames.shape[0] // 2)
    assert vision_inputs["video_grid_thw"].tolist() == [[t, h // 7, w // 7]]
    assert vision_inputs["pixel_values_videos"].shape == (t * (h // 7) * (w // 7), 3 * 2 * 7 * 7)
    assert other.num_tokens(clip.frames.shape[0], (h, w)) == vision_inputs["pixel_values_videos"].shape[0] // 4
    with pytest.raises(ValueError, match="the checkpoint is llava_onevision: use its dataset component"):
        QwenVideoFormat.from_model_config(read_hf_config(tiny_llava_dir))


def test_pixel_budgets_shrink_tokens():
    frames = DecodedVideo(torch.zeros(16, 3, 448, 448, dtype=torch.uint8), 1.0)

    def tokens(**kw):
        return num_video_tokens(16, *resized_sizes([frames], VideoOptions(min_pixels=784, **kw))[0])

    full = tokens(max_pixels=448 * 448)
    assert full == 8 * 16 * 16
    assert tokens(max_pixels=224 * 224) == 8 * 8 * 8
    assert tokens(max_pixels=448 * 448, total_pixels=256 * 784) <= 256 < full


# ---------------------------------------------------------------- dataset
def test_demo_data_shapes_and_labels(tokenizer, videos):
    """Items carry no positions (the model's rule, computed by the recipe on the full batch)."""
    ds = video_sft_dataset(tokenizer, videos / "train.jsonl", max_seq_len=512, **TINY)
    assert len(ds) == 6
    for index in (0, 1):  # conversations shape, messages shape
        item = ds[index]
        ids, labels = item["input_ids"], item["labels"]
        trained = tokenizer.decode(ids[1:][labels[:-1] != -100])
        assert trained.startswith("The square is ") and trained.endswith("<|im_end|>\n")
        assert "<|video_pad|>" not in trained and labels[-1] == -100
        grid = item["video_grid_thw"]
        assert int((ids == ds.video_token_id).sum()) == int(grid.prod()) // 4
        assert item["pixel_values_videos"].shape == (int(grid.prod()), 1176)
        assert "position_ids" not in item and item["second_per_grid_ts"].shape == (1,)
        assert not item["skipped"] and (item["document_ids"] == 0).all()


def test_items_carry_uint8_patches_that_normalise_to_the_processors_pixels(tokenizer, videos, tiny_qwen_dir):
    """Oracle: transformers' video processor on the same decoded frames, bit for bit, once the
    collated batch is normalised (what the recipe does on the model's device)."""
    from transformers import AutoVideoProcessor

    ds = video_sft_dataset(tokenizer, videos / "train.jsonl", max_seq_len=512, **TINY)
    items = [ds[0], ds[4]]
    assert all(i["pixel_values_videos"].dtype == torch.uint8 for i in items)
    batch = ds.normalize_pixels(collate_padded(items, ds.pad_id))
    reference = AutoVideoProcessor.from_pretrained(tiny_qwen_dir, local_files_only=True, max_video_tokens=10)
    clips = [
        decode_video(videos / json.loads(line)["video"]) for line in (videos / "train.jsonl").read_text().splitlines()
    ]
    expected = torch.cat(
        [reference(videos=[clips[i].frames], return_tensors="pt")["pixel_values_videos"] for i in (0, 4)]
    )
    assert batch["pixel_values_videos"].dtype == torch.float32
    assert torch.equal(batch["pixel_values_videos"], expected)


def test_sharegpt_and_messages_shapes_give_the_same_item(tokenizer, videos, tmp_path):
    turns = [("user", "<video>\nWhat colour?"), ("assistant", "Red."), ("user", "Again?"), ("assistant", "Red.")]
    messages = {"video": str(videos / "video_000.mp4"), "messages": [{"role": r, "content": c} for r, c in turns]}
    sharegpt = {
        "video": "video_000.mp4",
        "conversations": [{"from": "human" if r == "user" else "gpt", "value": c} for r, c in turns],
    }
    a = video_sft_dataset(tokenizer, _jsonl(tmp_path / "a.jsonl", [messages]), 512, **TINY)[0]
    b = video_sft_dataset(tokenizer, _jsonl(tmp_path / "b.jsonl", [sharegpt]), 512, data_root=videos, **TINY)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_collate_concatenates_vision_and_pads_rows(tokenizer, videos):
    ds = video_sft_dataset(tokenizer, videos / "train.jsonl", max_seq_len=512, **TINY)
    items = [ds[0], ds[4]]
    batch = collate_padded(items, ds.pad_id)
    length = max(len(i["input_ids"]) for i in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["document_ids"].shape == (2, length)
    short = min(items, key=lambda i: len(i["input_ids"]))
    row = 0 if short is items[0] else 1
    n = len(short["input_ids"])
    assert torch.equal(batch["input_ids"][row, :n], short["input_ids"])
    assert (batch["input_ids"][row, n:] == ds.pad_id).all() and (batch["labels"][row, n:] == -100).all()
    assert (batch["document_ids"][row, n:] == -1).all()
    for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        assert torch.equal(batch[key], torch.cat([i[key] for i in items]))
    assert batch["skipped"].tolist() == [False, False]


# ---------------------------------------------------------------- errors and skipping
@pytest.mark.parametrize(
    "sample, message",
    [
        (_sharegpt("video_000.mp4", question="What colour?"), r"bad\.jsonl:2: no <video> placeholders than videos"),
        (_sharegpt("video_000.mp4", question="<video><video> twice?"), r"bad\.jsonl:2: more <video> placeholders"),
        ({"video": "video_000.mp4", "conversations": [{"from": "robot", "value": "<video>"}]}, r"bad\.jsonl:2: turn 0"),
    ],
)
def test_malformed_samples_are_named(tokenizer, videos, tmp_path, sample, message):
    path = _jsonl(tmp_path / "bad.jsonl", [_sharegpt("video_000.mp4"), sample])
    with pytest.raises(ValueError, match=message):
        video_sft_dataset(tokenizer, path, 512, data_root=videos, **TINY)


def test_missing_video_is_an_error_or_dropped_and_counted(tokenizer, videos, tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [_sharegpt("video_000.mp4"), _sharegpt("nowhere.mp4")])
    with pytest.raises(FileNotFoundError, match=r"m\.jsonl:2: video file not found: .*nowhere\.mp4"):
        video_sft_dataset(tokenizer, path, 512, data_root=videos, **TINY)
    ds = video_sft_dataset(tokenizer, path, 512, data_root=videos, skip_bad_samples=True, **TINY)
    assert len(ds) == 1 and ds.num_skipped == 1


def _audio_only(path: Path) -> Path:
    """A media file with no video frame at all (an audio stream only)."""
    from torchcodec.encoders import AudioEncoder

    AudioEncoder(torch.zeros(1, 8000), sample_rate=8000).to_file(path)
    return path


def test_undecodable_videos_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(
        torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy().tobytes()
    )
    with pytest.raises(VideoDecodeError, match=r"corrupt\.mp4: cannot decode video"):
        decode_video(corrupt)
    with pytest.raises(VideoDecodeError, match=r"no_frames\.mp4: cannot decode video"):
        decode_video(_audio_only(tmp_path / "no_frames.mp4"))
    with pytest.raises(FileNotFoundError, match=r"absent\.mp4: video file not found"):
        decode_video(tmp_path / "absent.mp4")


def test_bad_items_raise_or_become_skipped_placeholders(tokenizer, videos, tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video" * 100)
    _write_video(tmp_path / "long.mp4", frames=20, fps=1)  # 20 s -> 20 frames -> 10 * 6 = 60 video tokens
    _audio_only(tmp_path / "silent.mp4")
    path = _jsonl(
        tmp_path / "s.jsonl",
        [
            _sharegpt(str(videos / "video_000.mp4")),
            _sharegpt("corrupt.mp4"),
            _sharegpt("long.mp4"),
            _sharegpt("silent.mp4"),
        ],
    )
    ds = video_sft_dataset(tokenizer, path, max_seq_len=80, **TINY)
    assert len(ds[0]["input_ids"]) <= 80
    with pytest.raises(BadSampleError, match=r"s\.jsonl:2: .*corrupt\.mp4: cannot decode video"):
        ds[1]
    with pytest.raises(
        BadSampleError,
        match=r"s\.jsonl:3: sample has \d+ tokens \(60 of them video, from .*long\.mp4\)"
        r", more than max_seq_len=80",
    ):
        ds[2]
    with pytest.raises(BadSampleError, match=r"s\.jsonl:4: .*silent\.mp4"):
        ds[3]

    ds = video_sft_dataset(tokenizer, path, max_seq_len=80, skip_bad_samples=True, **TINY)
    items = [ds[i] for i in range(len(ds))]
    assert [bool(i["skipped"]) for i in items] == [False, True, True, True]
    for placeholder in items[1:]:
        assert (placeholder["labels"] == -100).all()
        assert int((placeholder["input_ids"] == ds.video_token_id).sum()) == 1
        assert placeholder["video_grid_thw"].tolist() == [[1, 2, 2]]
    batch = collate_padded(items, ds.pad_id)
    assert int(batch["skipped"].sum()) == 3
    assert batch["video_grid_thw"].shape == (4, 3)
    assert batch["pixel_values_videos"].shape[0] == int(batch["video_grid_thw"].prod(-1).sum())


def test_tiny_chat_template_renders_video_items_and_text_as_before(tokenizer):
    text = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    assert tokenizer.apply_chat_template(text, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nok<|im_end|>\n"
    )
    listed = [{"role": "user", "content": [{"type": "video", "video": "a.mp4"}, {"type": "text", "text": "What?"}]}]
    assert tokenizer.apply_chat_template(listed, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_decode_threads_give_the_same_items_and_reach_ffmpeg(videos, tokenizer, monkeypatch):
    """``decode_threads`` (FFmpeg's threads per worker) changes the speed, not the frames: the
    items of every sample are equal at 1 and 3 threads, and the count is what FFmpeg is given."""
    import omnilong.data.video as video

    opened = []
    real_open = video._open

    def counting_open(path, device="cpu", threads=1):
        opened.append(threads)
        return real_open(path, device, threads)

    monkeypatch.setattr(video, "_open", counting_open)
    settings = {"video_min_pixels": TINY_MIN_PIXELS, "video_max_pixels": TINY_MAX_PIXELS}
    one = video_sft_dataset(tokenizer, videos / "train.jsonl", 512, **settings)
    three = video_sft_dataset(tokenizer, videos / "train.jsonl", 512, decode_threads=3, **settings)
    for index in range(len(one)):
        opened.clear()
        item = three[index]
        assert opened and set(opened) == {3}
        expected = one[index]
        assert all(torch.equal(item[k], expected[k]) for k in expected), index
    with pytest.raises(ValueError, match="decode_threads must be an integer >= 1"):
        VideoOptions(decode_threads=0)
