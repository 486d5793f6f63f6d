"""The model family comes from config.json's model_type; shared code asks the family."""

import pytest
import torch

from omnilong.hf_io import read_hf_config
from omnilong.models import LlavaOnevision, Qwen2_5_VL, build_model_from_hf_config
from omnilong.models.families import model_family


def test_each_tiny_checkpoint_builds_its_family(tiny_qwen_dir, tiny_llava_dir):
    with torch.device("meta"):
        assert isinstance(build_model_from_hf_config(read_hf_config(tiny_qwen_dir)), Qwen2_5_VL)
        assert isinstance(build_model_from_hf_config(read_hf_config(tiny_llava_dir)), LlavaOnevision)


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(
        ValueError, match="model_type 'llava_next' is not supported; supported: qwen2_5_vl, llava_onevision"
    ):
        model_family({"model_type": "llava_next"})


def test_shapes_table_is_the_checkpoint_written_by_transformers(tiny_llava_dir):
    """Every tensor hf_check expects is in the tiny checkpoint with that shape, and nothing else."""
    from safetensors import safe_open

    family = model_family(read_hf_config(tiny_llava_dir))
    expected = family.hf_tensor_shapes(read_hf_config(tiny_llava_dir))
    with safe_open(tiny_llava_dir / "model.safetensors", framework="pt") as f:
        found = {family.to_hub_layout(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert found == {k: tuple(size for size, _ in dims) for k, dims in expected.items()}


def test_every_family_has_its_context_parallelism():
    from omnilong.models.families import FAMILIES
    from omnilong.models.parallelize import CONTEXT_PARALLEL

    assert set(CONTEXT_PARALLEL) == set(FAMILIES)
