"""Native Qwen2.5-VL vision tower and multimodal model vs transformers.

Oracle: transformers' ``Qwen2_5_VLForConditionalGeneration`` loaded from the same tiny
random checkpoint, fp32 on CPU; tolerance: max abs diff <= 1e-5 for vision features,
logits and gradients. Both models get the same explicit M-RoPE ``position_ids`` (the
served rule, tests/models/qwen2_5_vl/test_rope_index.py): transformers 5.x places text
after a video by another rule.

The tiny tower has 56 px windows (2x2 merge groups), so the grids below give several
windows per frame, partial windows at the right/bottom edges, and (for sides that are
exact multiples) the all-padding windows transformers drops.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

from omnilong.hf_io import read_hf_config
from omnilong.models import attention as entry
from omnilong.models import load_hf_model
from omnilong.models.qwen2_5_vl import qwen2_5_vl, text_args_from_hf_config, vision_args_from_hf_config
from omnilong.models.qwen2_5_vl._convert_weights import native_to_hf
from omnilong.models.qwen2_5_vl.vision import (
    VisionAttention,
    frame_lengths,
    patch_positions,
    vision_rope_cos_sin,
    window_order,
)
from omnilong.models.varlen_attention import CPU_FLASH, AttentionKernel, VarlenSegments

ATOL = 1e-5
PATCH_DIM = 3 * 2 * 14 * 14


@pytest.fixture(scope="module")
def models(tiny_qwen_dir):
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_qwen_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    return hf, load_hf_model(tiny_qwen_dir)


def _hf_param(hf_model, hub_key):
    """Parameter of the transformers model by its hub checkpoint name."""
    for hub_prefix, memory_prefix in (("visual.", "model.visual."), ("model.", "model.language_model.")):
        if hub_key.startswith(hub_prefix):
            hub_key = memory_prefix + hub_key[len(hub_prefix) :]
            break
    return dict(hf_model.named_parameters())[hub_key]


def _video_patches(frames: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``[F, 3, H, W]`` frames -> (pixel rows, grid) exactly as the HF video processor lays
    them out (odd frame counts padded by repeating the last frame)."""
    patches, t, h, w = Qwen2VLVideoProcessor().patchify(
        frames[None], patch_size=14, merge_size=2, temporal_patch_size=2
    )
    return patches[0], [t, h, w]


class Sequence:
    """Builds one token row with its vision inputs, the way the processor lays them out:
    ``<|vision_start|> pad * (t * h * w / 4) <|vision_end|>`` per item."""

    def __init__(self, args, seed: int):
        self.args, self.gen = args, torch.Generator().manual_seed(seed)
        special = {args.image_token_id, args.video_token_id, args.vision_start_token_id, args.vision_end_token_id}
        self.text_ids = torch.tensor([i for i in range(args.vocab_size) if i not in special])
        self.ids: list[int] = []
        self.pixels = {"image": [], "video": []}
        self.grids = {"image": [], "video": []}

    def text(self, n: int) -> "Sequence":
        self.ids += self.text_ids[torch.randint(len(self.text_ids), (n,), generator=self.gen)].tolist()
        return self

    def image(self, h: int, w: int) -> "Sequence":
        return self._item("image", torch.randn(h * w, PATCH_DIM, generator=self.gen), [1, h, w])

    def video(self, t: int, h: int, w: int) -> "Sequence":
        return self._item("video", torch.randn(t * h * w, PATCH_DIM, generator=self.gen), [t, h, w])

    def video_frames(self, n_frames: int, height_px: int, width_px: int) -> "Sequence":
        frames = torch.randn(n_frames, 3, height_px, width_px, generator=self.gen)
        return self._item("video", *_video_patches(frames))

    def _item(self, kind: str, pixels: torch.Tensor, grid: list[int]) -> "Sequence":
        pad = self.args.image_token_id if kind == "image" else self.args.video_token_id
        self.ids += [self.args.vision_start_token_id] + [pad] * (grid[0] * grid[1] * grid[2] // 4)
        self.ids += [self.args.vision_end_token_id]
        self.pixels[kind].append(pixels)
        self.grids[kind].append(grid)
        return self

    def inputs(self, second_per_grid_ts=None) -> dict:
        out = {"input_ids": torch.tensor([self.ids])}
        for kind, pixel_key, grid_key in (
            ("image", "pixel_values", "image_grid_thw"),
            ("video", "pixel_values_videos", "video_grid_thw"),
        ):
            if self.grids[kind]:
                out[pixel_key] = torch.cat(self.pixels[kind])
                out[grid_key] = torch.tensor(self.grids[kind])
        if second_per_grid_ts is not None:
            out["second_per_grid_ts"] = torch.tensor(second_per_grid_ts)
        return out


MIXES = {
    "text+image": lambda s: s.text(5).image(6, 10).text(4),
    "text+image exact windows": lambda s: s.text(3).image(8, 4).text(2),
    "text+video": lambda s: s.text(4).video(2, 6, 10).text(6),
    "two videos": lambda s: s.text(3).video(2, 4, 6).text(2).video(3, 6, 4).text(3),
    "odd frame count": lambda s: s.text(2).video_frames(5, 56, 84).text(3),
    "image and videos": lambda s: s.text(2).video(1, 4, 4).text(1).image(6, 6).video(2, 6, 8).text(2),
}
SECONDS = {"text+video": [0.5], "two videos": [1.0, 2.0], "odd frame count": [0.5], "image and videos": [2.0, 0.5]}


def test_vision_args_are_the_same_in_both_config_layouts(tiny_qwen_dir, tiny_qwen_flat_dir):
    nested = vision_args_from_hf_config(read_hf_config(tiny_qwen_dir))
    assert nested == vision_args_from_hf_config(read_hf_config(tiny_qwen_flat_dir))
    shape = (nested.depth, nested.dim, nested.n_heads, nested.out_dim, nested.fullatt_block_indexes)
    assert shape == (2, 32, 2, 64, [1])
    assert (nested.window_units, nested.tokens_per_second, nested.patch_dim) == (2, 2, PATCH_DIM)


GRIDS = [[1, 6, 10], [2, 8, 4], [3, 4, 6], [1, 2, 2]]


def test_window_order_and_segments_equal_transformers(models):
    """Exact: the window permutation, the window and frame-pair segments (transformers'
    zero-length padding windows removed), and the 2-D rotary tables in window order."""
    hf, _ = models
    grid = torch.tensor(GRIDS)
    expected_index, cu_windows = get_vision_window_index(grid, spatial_merge_size=2, window_size=56, patch_size=14)
    order, lengths = window_order([tuple(g) for g in GRIDS], merge=2, window=2)
    assert torch.equal(order, expected_index)
    assert [0, *torch.tensor(lengths).cumsum(0).tolist()] == cu_windows.tolist()
    cu_frames, _ = get_vision_attention_seqlens(grid, hf.model.visual.config)
    assert [0, *torch.tensor(frame_lengths([tuple(g) for g in GRIDS])).cumsum(0).tolist()] == cu_frames.tolist()

    positions = patch_positions([tuple(g) for g in GRIDS], merge=2, device=torch.device("cpu"))
    assert torch.equal(positions, get_vision_position_ids(grid, 2))
    token_order = (order[:, None] * 4 + torch.arange(4)).flatten()
    cos, sin = vision_rope_cos_sin(positions[token_order], head_dim=16, theta=10_000.0)
    visual = hf.model.visual
    expected = [
        visual.permute_input_for_window_attn(t, expected_index, len(positions))
        for t in visual.rotary_pos_emb(positions.float(), positions)
    ]
    assert torch.equal(cos, expected[0]) and torch.equal(sin, expected[1])


def test_tower_features_match_transformers(models):
    hf, native = models
    grid = torch.tensor(GRIDS)
    pixels = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf.model.visual(pixels, grid_thw=grid).pooler_output
        actual = native.visual(pixels, grid)
    assert actual.shape == (int(grid.prod(-1).sum()) // 4, 64)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mix", list(MIXES))
def test_logits_and_gradients_match_transformers(models, mix):
    hf, native = models
    hf.zero_grad(set_to_none=True)
    native.zero_grad(set_to_none=True)
    inputs = MIXES[mix](Sequence(native.args, seed=len(mix))).inputs(SECONDS.get(mix))
    labels = torch.randint(
        native.args.vocab_size, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(1)
    )

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    # transformers 5.x would place text after a video by its own rule: both models get the served positions
    position_ids = native.multimodal_position_ids(
        inputs["input_ids"],
        inputs.get("image_grid_thw"),
        inputs.get("video_grid_thw"),
        inputs.get("second_per_grid_ts"),
    )
    expected = hf(**inputs, position_ids=position_ids).logits
    actual = native(**inputs, position_ids=position_ids)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
    loss(expected).backward()
    loss(actual).backward()
    native_params = dict(native.named_parameters())
    for native_key in [
        "visual.patch_embed.proj.weight",
        "visual.layers.0.attention.qkv.weight",
        "visual.layers.1.attention.wo.bias",
        "visual.layers.0.feed_forward.w1.bias",
        "visual.layers.1.ffn_norm.weight",
        "visual.merger.norm.weight",
        "visual.merger.w1.weight",
        "visual.merger.w2.bias",
        "tok_embeddings.weight",
        "layers.0.attention.wq.weight",
        "layers.1.feed_forward.w2.weight",
        "output.weight",
    ]:
        (hub_key,) = native_to_hf({native_key: None})
        torch.testing.assert_close(
            native_params[native_key].grad, _hf_param(hf, hub_key).grad, atol=ATOL, rtol=0, msg=native_key
        )


class _CopyReads(TorchDispatchMode):
    """Records the storage of every tensor that a copy (``clone``, ``_to_copy``, ``copy_``) reads."""

    COPIES = {"clone", "_to_copy", "copy_"}

    def __init__(self):
        super().__init__()
        self.sources: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.COPIES:
            source = args[1] if name == "copy_" else args[0]
            self.sources.append(source.untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_attention_gives_the_kernel_contiguous_qkv_and_never_copies_v(monkeypatch, dtype):
    """The CUDA flash kernel copies strided ``q``, ``k``, ``v`` (``.contiguous()``) in the forward
    and again in the backward. The vision attention hands every kernel call (a recording kernel
    around the CPU one, swapped in at ``kernel_for``) contiguous ``[N, H, D]`` tensors, and no
    copy reads ``v``'s storage in the forward or the backward: ``v`` is the projection's output."""
    seen = []

    def record(q, k, v):
        seen.append(v)
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous(), (q.stride(), k.stride(), v.stride())

    def forward(q, k, v, segments):
        record(q, k, v)
        return CPU_FLASH.forward(q, k, v, segments)

    def backward(dout, q, k, v, out, lse, segments):
        record(q, k, v)
        return CPU_FLASH.backward(dout, q, k, v, out, lse, segments)

    monkeypatch.setattr(entry, "kernel_for", lambda q: AttentionKernel(forward, backward))
    torch.manual_seed(0)
    layer = VisionAttention(32, 4).to(dtype)
    x = torch.randn(40, 32, dtype=dtype, requires_grad=True)
    rope = vision_rope_cos_sin(patch_positions([(1, 4, 10)], 2, x.device), head_dim=8, theta=10_000.0)
    segments = VarlenSegments.from_lengths([16, 16, 8], [16, 16, 8], causal=False, device=x.device)
    with _CopyReads() as copies:
        layer(x, rope, segments).sum().backward()
    assert len(seen) == 2 and seen[0].data_ptr() == seen[1].data_ptr()  # forward, then backward on the saved v
    assert seen[0].untyped_storage().data_ptr() not in copies.sources


@pytest.fixture(scope="module")
def processor(tiny_qwen_dir):
    """The tiny checkpoint's transformers Qwen2.5-VL processor (tokenizer, image and video processors)."""
    return AutoProcessor.from_pretrained(tiny_qwen_dir)


IMAGE_ITEM, VIDEO_ITEM = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
PROMPTS = {
    "image": [f"Look: {IMAGE_ITEM} what is it?"],
    "video": [f"Watch {VIDEO_ITEM} then say what moved."],
    "image and video": [f"{IMAGE_ITEM} and {VIDEO_ITEM}: the same?"],
    "left-padded batch": [f"Watch {VIDEO_ITEM} then say what moved.", f"{IMAGE_ITEM} it"],
}


@pytest.mark.parametrize("content", list(PROMPTS))
def test_processor_output_feeds_the_model(models, processor, content):
    """``native(**processor(...))`` takes every key the processor returns and computes the
    served positions itself; transformers gets them explicitly. Logits of real tokens within
    1e-5. The video is 6 frames at 1 fps: 3 frame pairs 2 s (4 positions) apart on a 2x3
    grid, so text after it lands elsewhere under transformers 5.x's own rule."""
    hf, native = models
    g = torch.Generator().manual_seed(0)
    text = PROMPTS[content]
    media = {}
    if IMAGE_ITEM in "".join(text):
        media["images"] = [(torch.rand(3, 56, 84, generator=g) * 255).to(torch.uint8)]
    if VIDEO_ITEM in "".join(text):
        media["videos"] = [(torch.rand(6, 3, 56, 84, generator=g) * 255).to(torch.uint8)]
        media["video_metadata"] = [{"fps": 1.0, "total_num_frames": 6}]
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=text, padding=True, return_tensors="pt", **media)
    if "videos" in media:
        assert inputs["second_per_grid_ts"].tolist() == [2.0] and inputs["video_grid_thw"].tolist() == [[3, 4, 6]]
    real = inputs["attention_mask"].bool()
    assert real.all() == (len(text) == 1)

    position_ids = native.multimodal_position_ids(
        inputs["input_ids"],
        inputs.get("image_grid_thw"),
        inputs.get("video_grid_thw"),
        inputs.get("second_per_grid_ts"),
        inputs["attention_mask"],
    )
    with torch.no_grad():
        actual = native(**inputs)
        expected = hf(**inputs, position_ids=position_ids).logits
    torch.testing.assert_close(actual[real], expected[real], atol=ATOL, rtol=0)


def test_pad_token_count_mismatch_is_an_error(models):
    _, native = models
    inputs = Sequence(native.args, seed=2).text(3).image(4, 4).text(2).inputs()
    inputs["input_ids"] = inputs["input_ids"][:, :-4]  # the text, <|vision_end|> and one image pad token cut off
    with pytest.raises(ValueError, match="image pad tokens and image features do not match: 3 .* 4 features"):
        native(**inputs)


def test_vision_inputs_to_a_text_only_model_are_an_error(tiny_qwen_dir):
    model = qwen2_5_vl(text_args_from_hf_config(read_hf_config(tiny_qwen_dir)))
    inputs = Sequence(model.args, seed=3).text(2).image(4, 4).inputs()
    with pytest.raises(ValueError, match="without a vision tower"):
        model(**inputs)


def test_uint8_pixels_are_refused_at_the_tower_not_trained_on_unnormalised(models):
    """Datasets give uint8 pixels, normalised on the device by the recipe; a path that forgot
    to normalise must fail loudly, not cast 0..255 values to the weights' dtype."""
    _, native = models
    grid = torch.tensor([GRIDS[0]])
    pixels = torch.randint(0, 256, (int(grid.prod()), PATCH_DIM), dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8 pixels: normalise them first"):
        native.visual(pixels, grid)
