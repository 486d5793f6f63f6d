"""The `omnilong` command (ls, cp, keys, run --help) and the recipe's command line, in-process."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from omnilong.cli import main, parse
from omnilong.config import KEYS, validate_config
from omnilong.config_files import load_config


def test_ls_lists_the_recipe_and_every_shipped_config(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["RECIPE", "CONFIG"] and out[1].split()[0] == "omnilong_full"
    names = [line.split()[-1] for line in out[1:]]
    assert "tiny/stage1_text" in names and "qwen2_5_vl_7b/stage3_video_sft" in names


def test_cp_copies_a_config_or_the_recipe_and_never_overwrites(tmp_path, capsys):
    assert main(["cp", "tiny/stage2_text_sft", str(tmp_path / "mine")]) == 0
    assert OmegaConf.load(tmp_path / "mine.yaml").max_steps == 40
    assert main(["cp", "omnilong_full", str(tmp_path)]) == 0
    assert "class OmniLongFullRecipe" in (tmp_path / "omnilong_full.py").read_text()
    assert main(["cp", "tiny/stage1_text", str(tmp_path / "mine.yaml")]) == 1
    assert "mine.yaml exists" in capsys.readouterr().err


def test_keys_prints_every_key_with_its_default(capsys):
    assert main(["keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [k.name for k in KEYS]
    assert lines[[k.name for k in KEYS].index("log_every_n_steps")].split()[1] == "1"


def test_run_without_config_says_what_is_missing(capsys):
    assert main(["run", "--nproc_per_node", "2"]) == 1
    assert "omnilong run needs --config" in capsys.readouterr().err
    assert main(["run", "--help"]) == 0
    assert "eval_every_n_steps" in capsys.readouterr().out


def _parsed(monkeypatch, *argv):
    """The config ``tune run omnilong_full ...`` would hand to the recipe."""
    seen = {}
    monkeypatch.setattr(sys, "argv", ["omnilong_full", *argv])
    with pytest.raises(SystemExit) as stop:
        parse(lambda cfg, dry_run=None: seen.setdefault("cfg", cfg) and 0)()
    return seen.get("cfg"), stop.value.code


def test_recipe_help_lists_the_config_keys(monkeypatch, capsys):
    cfg, code = _parsed(monkeypatch, "--help")
    assert code == 0 and cfg is None
    out = capsys.readouterr().out
    assert "config keys (default, meaning)" in out and all(k.name in out for k in KEYS)


def test_recipe_config_may_be_a_shipped_name_and_log_dir_follows_output_dir(monkeypatch, tmp_path):
    cfg, code = _parsed(monkeypatch, "--config", "qwen2_5_vl_7b/stage1_text", f"output_dir={tmp_path}/run")
    assert code == 0
    cfg = validate_config(cfg)
    assert cfg.metric_logger.log_dir == f"{tmp_path}/run/tensorboard"


def test_recipe_refuses_an_unknown_config_name_with_one_line(monkeypatch, capsys):
    cfg, code = _parsed(monkeypatch, "--config", "tiny/stage1_txt")
    assert code == 1 and cfg is None
    assert capsys.readouterr().err.startswith("omnilong_full: error: config tiny/stage1_txt: no such file")


def test_overrides_set_replace_and_delete_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "a: 1\nnested: {x: 2}\nopt: {_component_: torch.optim.SGD, lr: 0.1}\ngone: 3\nlogger: {_component_: m.L}\n"
    )
    cfg = load_config(
        path, ["a=5", "nested.x=[1, 2]", "opt=torch.optim.AdamW", "~gone", "b=None", "logger=None", "s=a=b"]
    )
    assert cfg.a == 5 and list(cfg.nested.x) == [1, 2] and cfg.b is None and cfg.logger is None and cfg.s == "a=b"
    assert cfg.opt._component_ == "torch.optim.AdamW" and cfg.opt.lr == 0.1  # the component changes, its arguments stay
    assert "gone" not in cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("max_steps", "override 'max_steps': write key=value to set a key, or ~key to delete one"),
        ("~no_such_key", "override ~no_such_key: the config has no key no_such_key to delete"),
        ("~dataset.no_such_key", "the config has no key dataset.no_such_key to delete"),
        ("optimizer.lr=[1,", "override 'optimizer.lr=[1,': the value is not YAML (YAML syntax error: "),
        (
            "--max_steps=3",
            "unknown option --max_steps=3: the recipe takes --config, key=value overrides and the dry run's options",
        ),
    ],
)
def test_recipe_refuses_a_malformed_override_with_one_line(monkeypatch, capsys, override, message):
    cfg, code = _parsed(monkeypatch, "--config", "tiny/stage1_text", override)
    assert code == 1 and cfg is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("omnilong_full: error: ") and message in err[0], err


@pytest.mark.parametrize(
    "text, where, problem",
    [
        ("a: 1\nb: [1, 2\nc: 3\n", "3:2", "did not find expected ',' or ']' (while parsing a flow sequence)"),
        ("a: 1\n  b: 2\n", "2:4", "mapping values are not allowed in this context"),
    ],
)
def test_a_yaml_syntax_error_is_one_line_naming_file_line_and_column(
    monkeypatch, capsys, tmp_path, text, where, problem
):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    cfg, code = _parsed(monkeypatch, "--config", str(path))
    assert code == 1 and cfg is None
    assert capsys.readouterr().err.splitlines() == [
        f"omnilong_full: error: {path}:{where}: YAML syntax error: {problem}"
    ]


def test_importing_the_recipe_imports_neither_torchtune_nor_torchvision():
    """Every rank imports the recipe: torchtune (with torchao) and torchvision would add about 3 s
    to each one's start-up. They are imported when used: a config naming a torchtune component,
    video frames to resize."""
    code = "import sys, omnilong_full; print([m for m in ('torchtune', 'torchao', 'torchvision') if m in sys.modules])"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"
