"""LLaVA-OneVision checkpoints back to the hub layout: a trained run checkpoint exported with
``export_hf_checkpoint`` (what ``tools/convert_checkpoint.py`` and ``save_hf_at_end`` call).

Oracle: transformers' ``from_pretrained`` of the export (no missing, unexpected or
mismatched key) against the native model holding the trained state dict, logits within 1e-5
on a video + text input; the native loader reads the export back to the same tensors.
"""

import json

import torch
from safetensors import safe_open
from transformers import LlavaOnevisionForConditionalGeneration

from omnilong.checkpoint.hf_export import export_hf_checkpoint
from omnilong.hf_io import INDEX_NAME, read_hf_config
from omnilong.models import load_hf_model
from tests.checkpoint.test_hf_export import save_run_checkpoint
from tests.models.llava_onevision.inputs import processor_inputs as _inputs
from tests.models.llava_onevision.inputs import random_video as _video

ATOL = 1e-5


def test_trained_export_loads_in_transformers_with_the_native_logits(tiny_llava_dir, tmp_path):
    native = load_hf_model(tiny_llava_dir).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # "train": move every tensor, vision tower, projector and newline included
        for param in native.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    checkpoint = save_run_checkpoint(tmp_path / "step_3", tiny_llava_dir, native.state_dict())
    out = export_hf_checkpoint(checkpoint, tiny_llava_dir, tmp_path / "hf")

    weight_map = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    assert "vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight" in weight_map  # the hub layout
    assert {"image_newline", "language_model.lm_head.weight", "multi_modal_projector.linear_2.bias"} <= set(weight_map)
    with safe_open(out / weight_map["image_newline"], framework="pt") as f:
        assert torch.equal(f.get_tensor("image_newline"), native.image_newline)
    assert read_hf_config(out) == read_hf_config(tiny_llava_dir)  # no Qwen position-rule field

    hf, info = LlavaOnevisionForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, attn_implementation="sdpa", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    inputs = _inputs(out, [{"type": "video"}, {"type": "text", "text": "where?"}], videos=[_video(2, 40, 60, seed=7)])
    with torch.no_grad():
        expected = native(**inputs)
        torch.testing.assert_close(hf(**inputs).logits, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(load_hf_model(out).eval()(**inputs), expected, atol=0, rtol=0)
