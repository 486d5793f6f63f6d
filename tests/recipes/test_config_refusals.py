"""What the recipe refuses before any compute, with the fix in one line: bad config keys and
values, checkpoints that disagree with their config.json. The recipe's command line runs in
this process (:func:`refused_in_process`: refused in its constructor, before any process group,
data or model); ``test_omnilong_full.py`` shows one such refusal through ``tune run``.
"""

import json
import shutil

import pytest

from tests.recipe_runs import STAGE1, refused_in_process


def _run(tiny_qwen_dir, output_dir, **extra):
    return {
        "checkpoint_dir": tiny_qwen_dir,
        "output_dir": output_dir,
        "max_seq_len": 128,
        "max_steps": 3,
        "dataset.max_files": 20,
        "shuffle": "false",
        **extra,
    }


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"max_seq_length": 64}, "unknown key 'max_seq_length' (did you mean 'max_seq_len'?)"),
        ({"max_seq_len": 0}, "max_seq_len must be a positive integer"),
        ({"checkpoint_dir": "/nonexistent/ckpt"}, "/nonexistent/ckpt/config.json not found"),
        ({"log_every_n_steps": 0}, "log_every_n_steps must be a positive integer, got 0"),
        ({"max_steps": "true"}, "max_steps must be a positive integer, got True"),
        (
            {"optimizer.lrr": 1e-4},
            "unknown key optimizer.lrr: torch.optim.AdamW takes no argument 'lrr' (did you mean optimizer.lr?)",
        ),
        ({"dataset.max_filez": 3}, "unknown key dataset.max_filez"),
        ({"~lr_scheduler.num_warmup_steps": None}, "missing key lr_scheduler.num_warmup_steps"),
        ({"shuffle": 3}, "shuffle must be true or false, got 3"),
    ],
)
def test_bad_config_fails_before_any_compute_with_the_fix(
    tiny_qwen_dir, tmp_path, monkeypatch, capsys, overrides, message
):
    error = refused_in_process(STAGE1, {**_run(tiny_qwen_dir, tmp_path / "out"), **overrides}, monkeypatch, capsys)
    assert message in error
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def _damage_config(model_dir, path, edit):
    """A copy of the HF checkpoint ``model_dir`` at ``path`` with ``edit`` applied to its config.json."""
    shutil.copytree(model_dir, path)
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_checkpoint_that_disagrees_with_its_config_names_the_key_and_the_file(
    tiny_qwen_dir, tmp_path, monkeypatch, capsys
):
    """A wrong hidden_size is reported as hidden_size (not as the M-RoPE section it breaks); a
    tensor missing from its shard is named as the file names it."""
    wrong = _damage_config(tiny_qwen_dir, tmp_path / "wrong", lambda c: c["text_config"].update(hidden_size=128))
    error = refused_in_process(STAGE1, _run(tiny_qwen_dir, tmp_path / "out", checkpoint_dir=wrong), monkeypatch, capsys)
    assert (
        "model.embed_tokens.weight is (1024, 64) in model.safetensors, but config.json gives (1024, 128) "
        "(text_config.hidden_size = 128)"
    ) in error

    from safetensors.torch import load_file, save_file

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_qwen_dir, sharded)
    weights = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for name, keys in halves.items():
        save_file({k: weights[k] for k in keys if k != "model.layers.1.mlp.down_proj.weight"}, sharded / name)
    index = {"metadata": {}, "weight_map": {k: name for name, keys in halves.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    shard = index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    error = refused_in_process(
        STAGE1, _run(tiny_qwen_dir, tmp_path / "out", checkpoint_dir=sharded), monkeypatch, capsys
    )
    assert (
        f"model.layers.1.mlp.down_proj.weight is missing from {sharded / shard}, where "
        "model.safetensors.index.json puts it"
    ) in error
