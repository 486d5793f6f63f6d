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
