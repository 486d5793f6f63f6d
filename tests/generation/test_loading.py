"""Loading a checkpoint for inference: a Hugging Face directory or a training step folder
(DCP weights + the run's config.yaml naming the base model). Oracle: the HF directory's
weights through load_hf_model; exact equality (the same tensors, copied)."""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from omnilong.generation.loading import describe_checkpoint, load_inference_model
from omnilong.models.hf_loading import load_hf_model


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process, as meant
def test_step_folder_loads_its_own_weights_on_its_base_model(tiny_qwen_dir, tmp_path):
    reference = load_hf_model(tiny_qwen_dir)
    trained = {k: v + 0.5 if k == "norm.weight" else v for k, v in reference.state_dict().items()}
    step = tmp_path / "checkpoints" / "step_7"
    dcp.save({"model": trained}, checkpoint_id=step, no_dist=True)
    OmegaConf.save(OmegaConf.create({"checkpoint_dir": str(tiny_qwen_dir), "rope_theta": 5e5}), step / "config.yaml")

    assert describe_checkpoint(step) == (tiny_qwen_dir, {"rope_theta": 5e5}, step)
    loaded = load_inference_model(step, torch.device("cpu"), torch.float32)
    assert loaded.model_dir == tiny_qwen_dir and loaded.model.args.rope_theta == 5e5
    state = loaded.model.state_dict()
    assert torch.equal(state["norm.weight"], trained["norm.weight"])
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    assert not loaded.model.training


def test_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        describe_checkpoint(tmp_path)
    step = tmp_path / "step_3"
    step.mkdir()
    (step / ".metadata").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        describe_checkpoint(step)
