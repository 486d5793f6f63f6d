"""Every shipped config is valid: known keys only, required keys present, components importable."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torchtune.config._utils import _get_component_from_path

from omnilong.config import validate_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def _components(node):
    if OmegaConf.is_dict(node):
        for key, value in node.items():
            if key == "_component_":
                yield value
            else:
                yield from _components(value)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_is_valid(path):
    cfg = validate_config(OmegaConf.load(path))
    for component in _components(cfg):
        assert callable(_get_component_from_path(component)), component


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_saves_checkpoints_and_hugging_face_weights(path):
    cfg = validate_config(OmegaConf.load(path))
    assert cfg.save_every_n_steps is not None and cfg.save_every_n_steps <= cfg.max_steps
    assert cfg.save_hf_at_end is True


STAGES = ("stage1_text.yaml", "stage2_text_sft.yaml", "stage3_video_sft.yaml")
# (directory, file-name prefix) of every chain of three stages: one per model and size.
CHAINS = sorted({(p.parent, p.name[: -len(stage)]) for p in CONFIGS for stage in STAGES if p.name.endswith(stage)})


@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: f"{c[0].name}/{c[1]}stage*")
def test_each_stage_starts_from_the_previous_stages_export(chain):
    """stage 2 trains the HF export of stage 1 (its output_dir/hf), stage 3 that of stage 2."""
    directory, prefix = chain
    stages = [OmegaConf.load(directory / (prefix + name)) for name in STAGES]
    for previous, stage in zip(stages, stages[1:]):
        assert Path(stage.checkpoint_dir) == Path(previous.output_dir) / "hf"


def test_freeze_projector_is_true_false_or_null():
    cfg = OmegaConf.load(CONFIGS[0])
    cfg.freeze_projector = "yes"
    with pytest.raises(ValueError, match="freeze_projector must be true, false or null, got 'yes'"):
        validate_config(cfg)
