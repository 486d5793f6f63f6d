"""The recipe trains LLaVA-OneVision as it trains Qwen2.5-VL: the family comes from the
checkpoint's config.json, nothing in the recipe is model-specific.

Runs are real ``tune run`` processes (gloo on CPU) of the tiny stage-3 config
(configs/tiny/llava_ov_stage3_video_sft.yaml) on the tiny videos.
"""

import shutil

import pytest
import torch

from omnilong.checkpoint.dcp_io import load_model_tensors, read_checkpoint_metadata
from tests.recipe_runs import REPO, assert_same_losses, metrics, recipe_run

pytestmark = pytest.mark.slow

STAGE3 = str(REPO / "configs/tiny/llava_ov_stage3_video_sft.yaml")


def _run(tiny_llava_dir, tiny_videos_dir, output_dir, **extra):
    return {
        "checkpoint_dir": tiny_llava_dir,
        "output_dir": output_dir,
        "max_steps": 2,
        "shuffle": "false",
        "gradient_accumulation_steps": 1,
        "dataset.data_files": f"[{tiny_videos_dir / 'train.jsonl'}]",
        "save_every_n_steps": 1,
        **extra,
    }


def test_video_sft_with_context_parallel_reproduces_single_process(tiny_llava_dir, tiny_videos_dir, tmp_path):
    """cp_degree=2 (frames encoded half on each rank, ring attention over zigzag shards) gives
    the per-step losses and gradient norms of one process within 1e-4."""
    one = recipe_run(STAGE3, _run(tiny_llava_dir, tiny_videos_dir, tmp_path / "one", save_every_n_steps="null"))
    assert one.returncode == 0, one.stderr[-3000:]
    cp = recipe_run(
        STAGE3, _run(tiny_llava_dir, tiny_videos_dir, tmp_path / "cp", save_every_n_steps="null", cp_degree=2), nproc=2
    )
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert_same_losses(tmp_path / "one", tmp_path / "cp")
    assert all(m["num_tokens"] > 0 for m in metrics(tmp_path / "one"))


def test_frozen_tower_trained_projector_resume_and_export(tiny_llava_dir, tiny_videos_dir, tmp_path):
    """freeze_vision with freeze_projector=false: optimizer state for the projector and the
    language model only. A run resumed from step 1 trains step 2 to the same loss and bitwise
    the same weights. save_hf_at_end writes the hub layout, which transformers loads with no
    missing or unexpected keys and the native logits (1e-5)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from omnilong.models import load_hf_model
    from tests.models.llava_onevision.inputs import processor_inputs, random_video

    out = tmp_path / "run"
    overrides = _run(
        tiny_llava_dir, tiny_videos_dir, out, freeze_vision="true", freeze_projector="false", save_hf_at_end="true"
    )
    first = recipe_run(STAGE3, overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    keys = read_checkpoint_metadata(out / "checkpoints/step_2").state_dict_metadata
    assert any(k.startswith("optimizer.state.projector.") for k in keys)
    assert not any(k.startswith("optimizer.state.visual.") for k in keys) and "model.image_newline" in keys
    uninterrupted = metrics(out)
    weights = load_model_tensors(out / "checkpoints/step_2")

    shutil.rmtree(out / "checkpoints/step_2")
    shutil.rmtree(out / "hf")
    resumed = recipe_run(STAGE3, {**overrides, "resume_from_checkpoint": "true"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same = ("step", "loss", "grad_norm", "num_tokens", "lr")
    assert [{k: m[k] for k in same} for m in metrics(out)] == [{k: m[k] for k in same} for m in uninterrupted]
    again = load_model_tensors(out / "checkpoints/step_2")
    assert all(torch.equal(again[k], weights[k]) for k in weights)

    hf, info = LlavaOnevisionForConditionalGeneration.from_pretrained(
        out / "hf", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    native = load_hf_model(out / "hf").eval()
    assert torch.equal(native.projector.w1.weight, weights["projector.w1.weight"])
    inputs = processor_inputs(
        out / "hf", [{"type": "video"}, {"type": "text", "text": "hi"}], videos=[random_video(2, 42, 42, seed=0)]
    )
    with torch.no_grad():
        torch.testing.assert_close(native(**inputs), hf.eval()(**inputs).logits, atol=1e-5, rtol=0)
