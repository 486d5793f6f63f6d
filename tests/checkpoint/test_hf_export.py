"""export_hf_checkpoint and tools/convert_checkpoint.py: a DCP training checkpoint back to an
HF model directory shaped like its base.

Oracles: the base checkpoint itself (an untrained export is bitwise equal to it, key for key);
transformers' Qwen2_5_VLForConditionalGeneration loading the export with no missing or
unexpected keys and giving the native model's logits (fp32, max abs diff <= 1e-5).
"""

import importlib.util
import json
import shutil
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from omnilong.checkpoint.hf_export import POSITION_RULE_KEY, export_hf_checkpoint, parse_size
from omnilong.hf_io import INDEX_NAME, read_hf_config, read_hf_state_dict
from omnilong.models import load_hf_model, qwen2_5_vl
from omnilong.models.qwen2_5_vl import text_args_from_hf_config
from omnilong.models.qwen2_5_vl.rope_index import POSITION_RULE

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "convert_checkpoint.py"
ATOL = 1e-5
NEW_ROPE_THETA = 50_000.0


def save_run_checkpoint(path: Path, base: Path, model_state: dict, rope_theta=None) -> Path:
    """A ``step_N`` directory as the recipe writes it: DCP (model + optimizer) and config.yaml."""
    state = {"model": model_state, "optimizer": {"state": {"lr": torch.tensor(1e-5)}}, "trainer": {"step": 7}}
    with warnings.catch_warnings():  # DCP warns that no_dist saves in one process, as intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=path, no_dist=True)
    OmegaConf.save(OmegaConf.create({"checkpoint_dir": str(base), "rope_theta": rope_theta}), path / "config.yaml")
    return path


@pytest.fixture(scope="module")
def untrained_checkpoint(tiny_qwen_dir, tmp_path_factory) -> Path:
    """The base weights saved as a training checkpoint, with no rope_theta override."""
    model = load_hf_model(tiny_qwen_dir)
    return save_run_checkpoint(tmp_path_factory.mktemp("run") / "step_0", tiny_qwen_dir, model.state_dict())


def base_weights(path: Path) -> dict[str, torch.Tensor]:
    return read_hf_state_dict(path)


def assert_index_matches_files(out: Path) -> dict[str, tuple[int, int]]:
    """Check the index against the shards; returns shard name -> (tensor count, tensor bytes)."""
    index = json.loads((out / INDEX_NAME).read_text())
    by_file: dict[str, set] = {}
    for key, name in index["weight_map"].items():
        by_file.setdefault(name, set()).add(key)
    sizes = {}
    for name, keys in by_file.items():
        with safe_open(out / name, framework="pt") as f:
            assert set(f.keys()) == keys and f.metadata() == {"format": "pt"}, name
            sizes[name] = (len(keys), sum(f.get_tensor(k).nbytes for k in keys))
    assert index["metadata"]["total_size"] == sum(nbytes for _, nbytes in sizes.values())
    assert sorted(by_file) == [f"model-{i:05d}-of-{len(by_file):05d}.safetensors" for i in range(1, len(by_file) + 1)]
    assert set(out.glob("*.safetensors")) == {out / name for name in by_file}
    return sizes


@pytest.mark.parametrize("max_shard_size, min_shards", [("5GB", 1), ("200KB", 3)])
def test_untrained_export_is_bitwise_the_base(
    tiny_qwen_dir, untrained_checkpoint, tmp_path, max_shard_size, min_shards
):
    """Oracle: the base's own tensors, key set, dtypes, files and config (plus the position rule)."""
    out = export_hf_checkpoint(untrained_checkpoint, tiny_qwen_dir, tmp_path / "hf", max_shard_size=max_shard_size)
    expected, actual = base_weights(tiny_qwen_dir), base_weights(out)
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), key
    shards = assert_index_matches_files(out)
    assert len(shards) >= min_shards
    for name, (count, nbytes) in shards.items():  # a tensor over the limit gets a shard of its own
        assert nbytes <= parse_size(max_shard_size) or count == 1, name
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        assert (out / name).is_file(), name
    assert read_hf_config(out) == {**read_hf_config(tiny_qwen_dir), POSITION_RULE_KEY: POSITION_RULE}
    assert not list(tmp_path.glob("hf.tmp-*"))


def test_checkpoint_is_read_one_shard_at_a_time(tiny_qwen_dir, untrained_checkpoint, tmp_path, monkeypatch):
    """Oracle: the keys each dcp.load call asks for are those of one output shard, never the model."""
    requests = []
    real_load = dcp.load

    def spy(state, **kwargs):
        requests.append(set(state))
        return real_load(state, **kwargs)

    monkeypatch.setattr("omnilong.checkpoint.dcp_io.dcp.load", spy)
    out = export_hf_checkpoint(untrained_checkpoint, tiny_qwen_dir, tmp_path / "hf", max_shard_size="200KB")
    weight_map = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    assert len(requests) == len(set(weight_map.values())) > 2
    trained = sum(len(r) for r in requests)
    assert trained == len(load_hf_model(tiny_qwen_dir).state_dict())
    assert max(len(r) for r in requests) < trained / 2


def test_bf16_base_exports_bf16_by_default(tiny_qwen_dir, untrained_checkpoint, tmp_path):
    """Oracle: each tensor keeps the base's dtype (fp32 training weights rounded to bf16) and
    config.json is the base's, with only the position rule added."""
    base = Path(shutil.copytree(tiny_qwen_dir, tmp_path / "bf16"))
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(base / "model.safetensors").items()}
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    out = export_hf_checkpoint(untrained_checkpoint, base, tmp_path / "hf")
    exported = base_weights(out)
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], v) for k, v in weights.items())
    assert read_hf_config(out) == {**read_hf_config(base), POSITION_RULE_KEY: POSITION_RULE}


def test_trained_export_loads_in_transformers_with_the_native_logits(tiny_qwen_dir, tmp_path):
    """Oracle: the native model built from the trained state dict with the run's rope_theta."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    state = load_hf_model(tiny_qwen_dir).state_dict()
    generator = torch.Generator().manual_seed(0)
    for key in (
        "tok_embeddings.weight",
        "layers.0.attention.wq.weight",
        "layers.1.feed_forward.w2.weight",
        "norm.weight",
        "output.weight",
    ):
        state[key] = state[key] + 0.05 * torch.randn(state[key].shape, generator=generator)
    checkpoint = save_run_checkpoint(tmp_path / "step_5", tiny_qwen_dir, state, rope_theta=NEW_ROPE_THETA)
    out = export_hf_checkpoint(checkpoint, tiny_qwen_dir, tmp_path / "hf")

    hf, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, attn_implementation="sdpa", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.text_config.rope_parameters["rope_theta"] == NEW_ROPE_THETA
    assert getattr(hf.config, POSITION_RULE_KEY) == POSITION_RULE  # what the model was trained with, visible
    args = text_args_from_hf_config(read_hf_config(tiny_qwen_dir))
    text_state = {k: v for k, v in state.items() if not k.startswith("visual.")}
    native = qwen2_5_vl(replace(args, rope_theta=NEW_ROPE_THETA))
    native.load_state_dict(text_state)
    stale = qwen2_5_vl(args)  # the base's rope_theta: shows the logits depend on the rewrite
    stale.load_state_dict(text_state)
    input_ids = torch.randint(0, args.vocab_size, (2, 24), generator=generator)
    with torch.no_grad():
        expected = native.eval()(input_ids=input_ids)
        actual = hf.eval()(input_ids=input_ids).logits
        assert not torch.allclose(stale.eval()(input_ids=input_ids), expected, atol=1e-3)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
    visual = {k: v for k, v in base_weights(out).items() if k.startswith("visual.")}
    base = base_weights(tiny_qwen_dir)
    assert visual and all(torch.equal(v, base[k]) for k, v in visual.items())


def test_tensors_the_run_did_not_have_are_copied_from_the_base(tiny_qwen_dir, tmp_path):
    """Oracle: the base's tensors, for a run that saved only part of the model (text only,
    final norm left out)."""
    state = {
        k: v
        for k, v in load_hf_model(tiny_qwen_dir).state_dict().items()
        if not k.startswith("visual.") and k != "norm.weight"
    }
    checkpoint = save_run_checkpoint(tmp_path / "step_1", tiny_qwen_dir, state)
    out = export_hf_checkpoint(checkpoint, tiny_qwen_dir, tmp_path / "hf")
    expected, actual = base_weights(tiny_qwen_dir), base_weights(out)
    assert set(actual) == set(expected) and any(k.startswith("visual.") for k in actual)
    assert all(torch.equal(actual[k], v) for k, v in expected.items())


def _save_sharded_run(rank: int, world_size: int, base: Path, path: Path) -> None:
    """Each rank saves its Shard(0) slice of every tensor, as an FSDP run's checkpoint holds them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    state = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in load_hf_model(base).state_dict().items()}
    dcp.save({"model": state}, checkpoint_id=path)


def test_checkpoint_sharded_over_two_ranks_is_reassembled(tiny_qwen_dir, tmp_path, run_distributed):
    """Oracle: the base's tensors, read back from two ranks' data files."""
    checkpoint = tmp_path / "step_1"
    run_distributed(_save_sharded_run, 2, tiny_qwen_dir, checkpoint)
    assert len(list(checkpoint.glob("*.distcp"))) == 2
    OmegaConf.save(
        OmegaConf.create({"checkpoint_dir": str(tiny_qwen_dir), "rope_theta": None}), checkpoint / "config.yaml"
    )
    out = export_hf_checkpoint(checkpoint, tiny_qwen_dir, tmp_path / "hf")
    expected, actual = base_weights(tiny_qwen_dir), base_weights(out)
    assert set(actual) == set(expected) and all(torch.equal(actual[k], v) for k, v in expected.items())


def test_tied_base_takes_the_embedding_only(tmp_path):
    """Oracle: a tied base stores no lm_head.weight; the run's output.weight (the same tensor) is
    left out, and every other tensor is the base's."""
    from omnilong.testing.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl

    base = write_tiny_qwen2_5_vl(tmp_path / "tied", tie_word_embeddings=True, num_hidden_layers=1)
    state = load_hf_model(base).state_dict()
    assert "output.weight" in state
    out = export_hf_checkpoint(save_run_checkpoint(tmp_path / "step_1", base, state), base, tmp_path / "hf")
    expected, actual = base_weights(base), base_weights(out)
    assert "lm_head.weight" not in actual and set(actual) == set(expected)
    assert all(torch.equal(actual[k], v) for k, v in expected.items())


def test_flat_config_gets_rope_theta_in_the_flat_place(tiny_qwen_flat_dir, tmp_path):
    """Oracle: the published layout keeps its shape (top-level rope_theta, rope_scaling with
    mrope_section, no text_config) and the config reader sees the run's value."""
    state = load_hf_model(tiny_qwen_flat_dir).state_dict()
    checkpoint = save_run_checkpoint(tmp_path / "step_1", tiny_qwen_flat_dir, state, rope_theta=NEW_ROPE_THETA)
    out = export_hf_checkpoint(checkpoint, tiny_qwen_flat_dir, tmp_path / "hf")
    config, base_config = read_hf_config(out), read_hf_config(tiny_qwen_flat_dir)
    assert config["rope_theta"] == NEW_ROPE_THETA and "text_config" not in config
    assert config["rope_scaling"] == base_config["rope_scaling"] and "mrope_section" in config["rope_scaling"]
    assert config["vision_config"] == base_config["vision_config"]
    assert {k: v for k, v in config.items() if k != "rope_theta"} == {
        **{k: v for k, v in base_config.items() if k != "rope_theta"},
        POSITION_RULE_KEY: POSITION_RULE,
    }
    assert text_args_from_hf_config(config).rope_theta == NEW_ROPE_THETA


def test_bfloat16_export_casts_tensors_and_config(tiny_qwen_dir, untrained_checkpoint, tmp_path):
    """Oracle: the base's fp32 tensors cast to bf16; config dtype says bfloat16."""
    out = export_hf_checkpoint(untrained_checkpoint, tiny_qwen_dir, tmp_path / "hf", dtype=torch.bfloat16)
    base, exported = base_weights(tiny_qwen_dir), base_weights(out)
    for key, tensor in base.items():
        assert exported[key].dtype == torch.bfloat16 and torch.equal(exported[key], tensor.to(torch.bfloat16)), key
    assert read_hf_config(out)["dtype"] == "bfloat16"


def test_transformers_v5_key_layout_base_is_mirrored(tiny_qwen_dir, untrained_checkpoint, tmp_path):
    """Oracle: a base stored with ``model.language_model.*`` names exports the same names."""
    base = Path(shutil.copytree(tiny_qwen_dir, tmp_path / "v5"))
    weights = load_file(base / "model.safetensors")
    renamed = {
        k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v for k, v in weights.items()
    }
    save_file(renamed, base / "model.safetensors", metadata={"format": "pt"})
    out = export_hf_checkpoint(untrained_checkpoint, base, tmp_path / "hf")
    exported = base_weights(out)
    assert set(exported) == set(renamed)
    assert all(torch.equal(exported[k], v) for k, v in renamed.items())


def test_checkpoint_tensor_without_a_place_in_the_base_is_named(tiny_qwen_dir, tmp_path):
    state = load_hf_model(tiny_qwen_dir).state_dict()
    state["layers.9.attention.wq.weight"] = torch.zeros(2, 2)
    checkpoint = save_run_checkpoint(tmp_path / "step_1", tiny_qwen_dir, state)
    with pytest.raises(ValueError, match=r"layers\.9\.attention\.wq\.weight"):
        export_hf_checkpoint(checkpoint, tiny_qwen_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_truncated_or_incomplete_checkpoint_is_an_error_naming_the_file(tiny_qwen_dir, untrained_checkpoint, tmp_path):
    truncated = Path(shutil.copytree(untrained_checkpoint, tmp_path / "truncated"))
    data_file = next(truncated.glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{data_file.name} is truncated"):
        export_hf_checkpoint(truncated, tiny_qwen_dir, tmp_path / "hf")

    no_metadata = Path(shutil.copytree(untrained_checkpoint, tmp_path / "no_metadata"))
    (no_metadata / ".metadata").unlink()
    with pytest.raises(FileNotFoundError, match=r"\.metadata not found"):
        export_hf_checkpoint(no_metadata, tiny_qwen_dir, tmp_path / "hf")

    bad_metadata = Path(shutil.copytree(untrained_checkpoint, tmp_path / "bad_metadata"))
    (bad_metadata / ".metadata").write_bytes(b"\x80\x04cos\nsystem\n.")  # a pickle that would call os.system
    with pytest.raises(ValueError, match=r"\.metadata.*refusing to load os\.system"):
        export_hf_checkpoint(bad_metadata, tiny_qwen_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("size, expected", [(123, 123), ("5GB", 5 * 10**9), ("200KB", 200_000), ("1.5MiB", 3 << 19)])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


def _load_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cli_runs_end_to_end(tiny_qwen_dir, untrained_checkpoint, tmp_path):
    """Oracle: the same export as the function gives (bitwise the base here)."""
    out = tmp_path / "hf"
    result = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--checkpoint",
            str(untrained_checkpoint),
            "--base",
            str(tiny_qwen_dir),
            "--output",
            str(out),
            "--dtype",
            "float32",
            "--max-shard-size",
            "300KB",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "UserWarning" not in result.stderr
    expected, actual = base_weights(tiny_qwen_dir), base_weights(out)
    assert set(actual) == set(expected) and all(torch.equal(actual[k], v) for k, v in expected.items())
    assert_index_matches_files(out)


def test_cli_errors_are_one_line_without_traceback(tiny_qwen_dir, untrained_checkpoint, tmp_path, capsys):
    tool = _load_tool()
    assert (
        tool.main(
            ["--checkpoint", str(tmp_path / "nope"), "--base", str(tiny_qwen_dir), "--output", str(tmp_path / "a")]
        )
        == 1
    )
    assert "nope/.metadata not found" in capsys.readouterr().err
    assert (
        tool.main(["--checkpoint", str(untrained_checkpoint), "--base", str(tmp_path), "--output", str(tmp_path / "b")])
        == 1
    )
    assert "no model.safetensors.index.json or model.safetensors" in capsys.readouterr().err
    for flag, value in (("--dtype", "int3"), ("--max-shard-size", "lots")):
        with pytest.raises(SystemExit) as exit_info:
            tool.main(["--checkpoint", "c", "--base", "b", "--output", "o", flag, value])
        assert exit_info.value.code == 2
        assert value in capsys.readouterr().err


def test_cli_push_to_hub_creates_the_repo_and_uploads_the_output(
    tiny_qwen_dir, untrained_checkpoint, tmp_path, monkeypatch
):
    """Oracle: the calls made to a stand-in HfApi (nothing leaves the machine)."""
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return "https://huggingface.co/me/tiny/commit/0"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    out = tmp_path / "hf"
    assert (
        _load_tool().main(
            [
                "--checkpoint",
                str(untrained_checkpoint),
                "--base",
                str(tiny_qwen_dir),
                "--output",
                str(out),
                "--push-to-hub",
                "me/tiny",
                "--private",
            ]
        )
        == 0
    )
    assert calls[0] == ("create_repo", "me/tiny", {"private": True, "exist_ok": True})
    assert calls[1][0] == "upload_folder" and calls[1][1]["repo_id"] == "me/tiny"
    assert Path(calls[1][1]["folder_path"]) == out


def test_shapes_that_disagree_with_the_base_config_are_refused_before_writing(
    tiny_qwen_dir, untrained_checkpoint, tmp_path
):
    """A base whose config.json has another intermediate_size than its weights (and the
    checkpoint) would export a model from_pretrained cannot load: an error naming the
    tensor, both shapes and the config key; nothing is written."""
    base = Path(shutil.copytree(tiny_qwen_dir, tmp_path / "base"))
    config = json.loads((base / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.mlp\.gate_proj\.weight is \(176, 64\) in "
        r"model\.safetensors, but config\.json gives \(96, 64\) "
        r"\(text_config\.intermediate_size = 96\)",
    ):
        export_hf_checkpoint(untrained_checkpoint, base, tmp_path / "hf")

    state = load_hf_model(tiny_qwen_dir).state_dict()
    state["layers.1.feed_forward.w2.weight"] = torch.zeros(64, 200)
    checkpoint = save_run_checkpoint(tmp_path / "step_1", tiny_qwen_dir, state)
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.1\.mlp\.down_proj\.weight is \(64, 200\) in the checkpoint "
        r"\(layers\.1\.feed_forward\.w2\.weight\), but config\.json gives \(64, 176\) "
        r"\(text_config\.intermediate_size = 176\)",
    ):
        export_hf_checkpoint(checkpoint, tiny_qwen_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob("hf.tmp-*"))
