"""load_hf_model: every tensor accounted for, and errors that name what is wrong."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnilong.hf_io import read_hf_config
from omnilong.models import load_hf_model
from omnilong.models.hf_loading import check_state_dict_matches, load_native_state_dict
from omnilong.models.qwen2_5_vl import qwen2_5_vl, text_args_from_hf_config
from omnilong.models.qwen2_5_vl._convert_weights import native_to_hf


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_weights(path, edit):
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def test_every_checkpoint_tensor_loads(tiny_qwen_dir):
    """Vision tower included: each hub tensor lands, unchanged, in the native model."""
    checkpoint = load_file(tiny_qwen_dir / "model.safetensors")
    loaded = native_to_hf(load_hf_model(tiny_qwen_dir).state_dict())
    assert sorted(loaded) == sorted(checkpoint)
    assert any(k.startswith("visual.blocks.") for k in loaded)
    for key, tensor in checkpoint.items():
        assert torch.equal(loaded[key], tensor), key


def test_text_only_model_reports_the_vision_weights_it_leaves_out(tiny_qwen_dir, caplog):
    with torch.device("meta"):
        model = qwen2_5_vl(text_args_from_hf_config(read_hf_config(tiny_qwen_dir)))
    with caplog.at_level(logging.WARNING):
        state_dict = check_state_dict_matches(model, load_native_state_dict(tiny_qwen_dir))
    assert "vision-tower tensors of the checkpoint are not loaded" in caplog.text and "visual." in caplog.text
    assert sorted(state_dict) == sorted(model.state_dict())


def test_transformers_v5_in_memory_key_layout_loads(tiny_qwen_dir, tmp_path):
    path = _copy(tiny_qwen_dir, tmp_path / "v5")
    _rewrite_weights(
        path,
        lambda w: w.update(
            {
                k.replace("model.", "model.language_model.", 1): w.pop(k)
                for k in [k for k in w if k.startswith("model.")]
            }
        ),
    )
    reference = load_hf_model(tiny_qwen_dir)
    reloaded = load_hf_model(path)
    for (name, a), (_, b) in zip(reference.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_unknown_key_is_an_error_naming_it(tiny_qwen_dir, tmp_path):
    path = _copy(tiny_qwen_dir, tmp_path / "extra")
    _rewrite_weights(path, lambda w: w.update({"model.layers.0.mystery.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="model.layers.0.mystery.weight"):
        load_hf_model(path)


def test_missing_key_and_shape_mismatch_are_errors_naming_them(tiny_qwen_dir, tmp_path):
    path = _copy(tiny_qwen_dir, tmp_path / "broken")

    def edit(w):
        del w["model.layers.1.mlp.up_proj.weight"]
        w["model.norm.weight"] = torch.ones(3)

    _rewrite_weights(path, edit)
    with pytest.raises(ValueError, match=r"layers\.1\.feed_forward\.w3\.weight.*norm\.weight: checkpoint \(3,\)"):
        load_hf_model(path)


def test_truncated_weights_file_is_an_error_naming_it(tiny_qwen_dir, tmp_path):
    path = _copy(tiny_qwen_dir, tmp_path / "truncated")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_hf_model(path)


def test_missing_directory_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="local Hugging Face model directory"):
        load_hf_model(tmp_path / "nope")


def test_sharded_checkpoint_with_index_loads(tiny_qwen_dir, tmp_path):
    path = _copy(tiny_qwen_dir, tmp_path / "sharded")
    weights = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    keys = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, shard_keys in shards.items():
        save_file({k: weights[k] for k in shard_keys}, path / name, metadata={"format": "pt"})
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    reference = load_hf_model(tiny_qwen_dir)
    for (name, a), (_, b) in zip(reference.state_dict().items(), load_hf_model(path).state_dict().items()):
        assert torch.equal(a, b), name
