"""Native LLaVA-OneVision vs transformers' LlavaOnevisionForConditionalGeneration.

Oracle: transformers' implementation loaded from the same tiny random checkpoint (hub
layout), fp32 on CPU, inputs from the checkpoint's own LlavaOnevisionProcessor; tolerance:
max abs diff <= 1e-5 for logits and for every parameter's gradient.
"""

import pytest
import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from omnilong.models import load_hf_model
from omnilong.models.llava_onevision import llava_onevision_7b
from omnilong.models.llava_onevision._convert_weights import native_to_hf, to_hub_layout
from tests.models.llava_onevision.inputs import processor_inputs as _inputs
from tests.models.llava_onevision.inputs import random_image as _image
from tests.models.llava_onevision.inputs import random_video as _video

ATOL = 1e-5


def _hf_model(path):
    return LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")


def _assert_logits_and_gradients_match(path, inputs):
    hf, native = _hf_model(path), load_hf_model(path)
    labels = torch.randint(
        0, native.args.vocab_size, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(1)
    )

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    expected, actual = hf(**inputs).logits, native(**inputs)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
    loss(expected).backward()
    loss(actual).backward()
    hf_params = {to_hub_layout(k): p for k, p in hf.named_parameters()}
    compared = 0
    for native_key, param in native.named_parameters():
        (hub_key,) = native_to_hf({native_key: None})
        hf_grad = hf_params[hub_key].grad
        if hf_grad is None:  # post_layernorm (outside the features), the tower for text: in neither graph
            assert param.grad is None, native_key
            continue
        torch.testing.assert_close(param.grad, hf_grad, atol=ATOL, rtol=0, msg=native_key)
        compared += 1
    return compared


def test_text_logits_and_gradients_match_transformers(tiny_llava_dir):
    inputs = _inputs(tiny_llava_dir, [{"type": "text", "text": "def main(): return 42"}])
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert _assert_logits_and_gradients_match(tiny_llava_dir, inputs) == 27  # the language model's 27 tensors


def test_video_logits_and_gradients_match_transformers(tiny_llava_dir):
    """Frames through SigLIP one by one, 3x3 features pooled bilinearly to 2x2, one newline."""
    inputs = _inputs(
        tiny_llava_dir, [{"type": "video"}, {"type": "text", "text": "what moves?"}], videos=[_video(5, 50, 70, seed=0)]
    )
    assert int((inputs["input_ids"] == 1025).sum()) == 5 * 4 + 1  # frames * pooled^2 + newline
    assert _assert_logits_and_gradients_match(tiny_llava_dir, inputs) == 69 - 2  # all but post_layernorm


@pytest.mark.parametrize("size", [(50, 130), (250, 140)], ids=["wide-unpadded", "tall-unpadded-downscaled"])
def test_anyres_image_logits_and_gradients_match_transformers(tiny_llava_dir, size):
    """Odd aspect ratios: 50x130 goes into a 2x4-crop grid (6x12 features) whose padded rows are
    cut (4x12 left); 250x140 into 6x4 crops (18x12), columns cut (18x10), more than 9 crops'
    worth (9x9 features), so it is downscaled by 1.49 (anyres_max_9)."""
    inputs = _inputs(
        tiny_llava_dir, [{"type": "image"}, {"type": "text", "text": "describe"}], images=[_image(*size, seed=2)]
    )
    assert _assert_logits_and_gradients_match(tiny_llava_dir, inputs) == 69 - 2


def test_image_video_and_text_in_one_sequence_match_transformers(tiny_llava_dir):
    inputs = _inputs(
        tiny_llava_dir,
        [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "both?"}],
        images=[_image(90, 40, seed=3)],
        videos=[_video(3, 42, 42, seed=4)],
    )
    assert {"pixel_values", "image_sizes", "pixel_values_videos"} <= set(inputs)
    assert _assert_logits_and_gradients_match(tiny_llava_dir, inputs) == 69 - 2


def test_two_images_in_one_sample_match_transformers(tiny_llava_dir):
    """A sample of several images takes each as its base crop and a newline (no anyres grid)."""
    inputs = _inputs(
        tiny_llava_dir,
        [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "same?"}],
        images=[[_image(50, 130, seed=8), _image(90, 40, seed=9)]],
    )
    assert inputs["batch_num_images"].tolist() == [2]
    assert int((inputs["input_ids"] == 1024).sum()) == 2 * (9 + 1)
    assert _assert_logits_and_gradients_match(tiny_llava_dir, inputs) == 69 - 2


def test_7b_parameter_count_equals_transformers():
    """On the meta device, the published llava-onevision-qwen2-7b-ov-hf shape."""
    with torch.device("meta"):
        native = llava_onevision_7b()
        hf = LlavaOnevisionForConditionalGeneration(
            LlavaOnevisionConfig(
                text_config=dict(
                    model_type="qwen2",
                    vocab_size=152128,
                    hidden_size=3584,
                    intermediate_size=18944,
                    num_hidden_layers=28,
                    num_attention_heads=28,
                    num_key_value_heads=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                ),
            )
        )
    assert sum(p.numel() for p in native.parameters()) == sum(p.numel() for p in hf.parameters())


def test_videos_back_to_back_equal_the_processor_layout(tiny_llava_dir):
    """OmniLong's data layout (frames of all videos concatenated, ``video_num_frames``) gives the
    logits of the processor's ``[n_videos, frames, ...]`` layout; videos may differ in length."""
    native = load_hf_model(tiny_llava_dir).eval()
    inputs = _inputs(
        tiny_llava_dir,
        [{"type": "video"}, {"type": "video"}, {"type": "text", "text": "same?"}],
        videos=[_video(3, 42, 42, seed=5), _video(3, 50, 60, seed=6)],
    )
    flat = {
        **inputs,
        "pixel_values_videos": inputs["pixel_values_videos"].flatten(0, 1),
        "video_num_frames": torch.tensor([3, 3]),
    }
    with torch.no_grad():
        torch.testing.assert_close(native(**flat), native(**inputs), atol=ATOL, rtol=0)
        one, two = inputs["pixel_values_videos"][0, :1], inputs["pixel_values_videos"][1]  # 1 and 3 frames
        short = native.video_features(torch.cat([one, two]), torch.tensor([1, 3]))
        assert short.shape[0] == (1 * 4 + 1) + (3 * 4 + 1)
        torch.testing.assert_close(short[5:], native.video_features(two[None]), atol=ATOL, rtol=0)


# The fields of llava-onevision-qwen2-7b-ov-hf's published config.json that the native model
# reads (written by transformers 4.x: flat text_config with rope_theta, sparse vision_config).
HUB_CONFIG = {
    "architectures": ["LlavaOnevisionForConditionalGeneration"],
    "model_type": "llava_onevision",
    "image_token_index": 151646,
    "video_token_index": 151647,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
    "vision_aspect_ratio": "anyres_max_9",
    "image_grid_pinpoints": [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)],
    "tie_word_embeddings": False,
    "use_image_newline_parameter": True,
    "text_config": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "vocab_size": 152128,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "image_size": 384,
        "intermediate_size": 4304,
        "num_attention_heads": 16,
        "num_hidden_layers": 26,
        "patch_size": 14,
        "vision_use_head": False,
    },
}


def test_published_config_gives_the_7b_args():
    from omnilong.models.llava_onevision import (
        LlavaOnevisionTextArgs,
        SiglipVisionArgs,
        text_args_from_hf_config,
        vision_args_from_hf_config,
    )

    assert text_args_from_hf_config(HUB_CONFIG) == LlavaOnevisionTextArgs()
    assert vision_args_from_hf_config(HUB_CONFIG) == SiglipVisionArgs()


@pytest.mark.parametrize(
    "field, value, message",
    [
        (("vision_config", "vision_use_head"), True, "vision_use_head=true is not supported"),
        (("text_config", "use_sliding_window"), True, "use_sliding_window=true"),
        (("vision_feature_layer",), [-2, -1], "vision_feature_layer=\\[-2, -1\\] is not supported"),
        (("vision_aspect_ratio",), "anyres", "vision_aspect_ratio 'anyres' is not supported"),
    ],
)
def test_unsupported_config_fields_are_named(field, value, message):
    import copy

    from omnilong.models import build_model_from_hf_config

    config = copy.deepcopy(HUB_CONFIG)
    node = config
    for key in field[:-1]:
        node = node[key]
    node[field[-1]] = value
    with torch.device("meta"), pytest.raises(ValueError, match=message):
        build_model_from_hf_config(config)


def test_uint8_frames_are_refused_at_the_tower_not_trained_on_unnormalised(tiny_llava_dir):
    """As for Qwen2.5-VL: the recipe normalises the datasets' uint8 frames on the device; the
    tower refuses integer pixels instead of casting 0..255 to its dtype."""
    native = load_hf_model(tiny_llava_dir)
    frames = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)  # refused before its size matters
    with pytest.raises(TypeError, match="uint8 pixels: normalise them first"):
        native.video_features(frames[None])
