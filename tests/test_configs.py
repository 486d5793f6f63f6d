"""Every shipped config is valid: known keys only, required keys present, components importable."""

import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from omnilong.config import (
    DEFAULTS,
    KEYS,
    REQUIRED_KEYS,
    component_from_path,
    instantiate,
    keys_markdown,
    validate_config,
)

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
        assert callable(component_from_path(component)), component


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


def test_docs_config_keys_table_is_the_registry():
    """docs/configuration.md's table is `omnilong keys --markdown`: regenerate it after changing omnilong/config.py KEYS."""
    page = (Path(__file__).resolve().parents[1] / "docs/configuration.md").read_text()
    assert keys_markdown() in page


def test_every_key_has_a_meaning_and_defaults_follow_the_registry():
    assert all(k.meaning.strip() for k in KEYS)
    assert set(REQUIRED_KEYS) | set(DEFAULTS) == {k.name for k in KEYS}
    assert len(KEYS) == len({k.name for k in KEYS})


def _stage1(**overrides):
    return OmegaConf.merge(
        OmegaConf.load(Path(__file__).resolve().parents[1] / "configs/tiny/stage1_text.yaml"), overrides
    )


def test_a_metric_logger_whose_package_is_missing_is_refused_naming_the_extra(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a)
    )
    cfg = _stage1(metric_logger={"_component_": "torchtune.training.metric_logging.WandBLogger", "project": "x"})
    with pytest.raises(
        ValueError, match=r"needs the 'wandb' package.*pip install -e \"\.\[wandb\]\".*OMNILONG_EXTRAS=wandb"
    ):
        validate_config(cfg)


def test_eval_every_n_steps_needs_a_validation_dataset():
    with pytest.raises(ValueError, match="eval_every_n_steps is set but validation_dataset is not"):
        validate_config(_stage1(eval_every_n_steps=10))
    with pytest.raises(ValueError, match="unknown key validation_dataset.max_filez"):
        validate_config(
            _stage1(validation_dataset={"_component_": "omnilong.testing.python_stdlib_dataset", "max_filez": 3})
        )


def test_freeze_projector_is_true_false_or_null():
    cfg = OmegaConf.load(CONFIGS[0])
    cfg.freeze_projector = "yes"
    with pytest.raises(ValueError, match="freeze_projector must be true, false or null, got 'yes'"):
        validate_config(cfg)


@pytest.mark.parametrize(
    "path, message",
    [
        (
            "torch.optim.AdamX",
            "optimizer._component_: cannot use 'torch.optim.AdamX' (AttributeError: torch.optim has no attribute 'AdamX')",
        ),
        ("torhc.optim.AdamW", "cannot use 'torhc.optim.AdamW' (ImportError: no module named 'torhc')"),
        ("torch.optim..AdamW", "(ImportError: 'torch.optim..AdamW' is not a dotted path such as torch.optim.AdamW)"),
    ],
)
def test_a_component_that_cannot_be_imported_is_named(path, message):
    with pytest.raises(ValueError) as refused:
        validate_config(_stage1(optimizer={"_component_": path, "lr": 1e-3}))
    assert message in str(refused.value)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"lr": -1}, "optimizer torch.optim.AdamW refuses its arguments: Invalid learning rate: -1"),
        ({"lr": 1e-3, "betas": [0.9, 1.5]}, "refuses its arguments: Invalid beta parameter at index 1: 1.5"),
        ({"lr": 1e-3, "eps": -1e-8}, "refuses its arguments: Invalid epsilon value: -1e-08"),
        ({"lr": 1e-3, "weight_decay": -0.1}, "refuses its arguments: Invalid weight_decay value: -0.1"),
    ],
)
def test_optimizer_arguments_torch_refuses_fail_at_validation(arguments, message):
    """Before the model loads (the recipe validates first): torch's own check, on a dummy parameter."""
    with pytest.raises(ValueError) as refused:
        validate_config(_stage1(optimizer={"_component_": "torch.optim.AdamW", **arguments}))
    assert message in str(refused.value)


def test_a_component_whose_own_import_fails_reports_the_missing_module(tmp_path, monkeypatch):
    """A module that exists but imports a missing package: the missing package is named, not the
    component (which would send the user looking for a typo)."""
    (tmp_path / "my_components.py").write_text("import not_installed_package\n")
    monkeypatch.syspath_prepend(tmp_path)
    with pytest.raises(ModuleNotFoundError, match="not_installed_package"):
        component_from_path("my_components.MyDataset")


def test_instantiate_builds_the_component_with_the_nodes_arguments_and_the_callers():
    cfg = OmegaConf.create({"lr": 0.5, "opt": {"_component_": "torch.optim.SGD", "lr": "${lr}", "momentum": 0.9}})
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = instantiate(cfg.opt, params, momentum=0.0)  # keyword arguments win over the node's
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["lr"] == 0.5 and optimizer.param_groups[0]["momentum"] == 0.0
