"""The shipped configs (where they are, their names, ``--config`` values that name one) and
reading a config file with its command-line overrides.

Configs live in the checkout's ``configs/`` folder, next to the ``omnilong`` package; the
editable install of ``scripts/setup.sh`` (``pip install -e``) reads them there. A
non-editable install (``pip install .``) does not ship them: give ``--config`` a path.
"""

import difflib
from collections.abc import Sequence
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"


def shipped_configs(root: Path = CONFIG_ROOT) -> dict[str, Path]:
    """Name -> path of every shipped config; the name is the path under ``root`` without
    ``.yaml`` (``tiny/stage1_text``). Empty when ``root`` does not exist."""
    return {str(p.relative_to(root).with_suffix("")): p for p in sorted(root.rglob("*.yaml"))}


def resolve_config(value: str, root: Path = CONFIG_ROOT) -> Path:
    """The config file ``--config value`` means: ``value`` itself when that file exists, else
    the shipped config it names, by full name (``qwen2_5_vl_7b/stage1_text``, ``.yaml``
    optional) or by file name when only one config has it (``stage1_text.yaml`` is ambiguous:
    tiny and 7B both have one).

    Raises:
        FileNotFoundError: no such file and no shipped config of that name (listing the
            closest names), or a file name that several shipped configs share (listing them).
    """
    if Path(value).is_file():
        return Path(value)
    configs = shipped_configs(root)
    name = value.removesuffix(".yaml")
    if name in configs:
        return configs[name]
    same_file = [n for n in configs if Path(n).name == name]
    if len(same_file) == 1:
        return configs[same_file[0]]
    if same_file:
        raise FileNotFoundError(
            f"config {value}: several shipped configs have that name: {', '.join(same_file)}; give the full name"
        )
    close = difflib.get_close_matches(name, list(configs) + sorted({Path(n).name for n in configs}), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(dict.fromkeys(close))}?" if close else "; `omnilong ls` lists them"
    if not configs:
        hint = " (a non-editable install does not ship them); give a path"
    raise FileNotFoundError(f"config {value}: no such file, nor a shipped config ({len(configs)} in {root}){hint}")


def load_config(path: Path, overrides: Sequence[str]) -> DictConfig:
    """The YAML config at ``path`` with the command line's ``overrides`` applied, as ``tune run``
    reads them:

    - ``key=value`` sets ``key`` (dotted for a nested one: ``dataset.max_files=20``); the value
      is read as YAML, and ``None`` is null;
    - ``key=dotted.path`` on a component node (one with a ``_component_``) replaces the
      component and keeps its arguments, as ``key._component_=dotted.path`` does;
    - ``~key`` deletes ``key`` (its default then applies; a required key is then missing).

    Raises:
        ValueError: a YAML syntax error (one line naming file, line and column), an override
            that is neither ``key=value`` nor ``~key`` or whose value is not YAML, a ``~key``
            that names no key, or a config with a top-level key ``config``.
    """
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # where the parser stopped, 0-based
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where}: {_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); a config is a YAML file") from None
    if "config" in cfg:
        raise ValueError(f"{path}: a config may not have a key named 'config' (--config names the file)")
    dotlist = []
    for arg in overrides:
        if arg.startswith("~"):
            _delete(cfg, arg[1:].split("=")[0])
            continue
        key, equals, value = arg.partition("=")
        if not key or not equals:
            raise ValueError(f"command-line override {arg!r}: write key=value to set a key, or ~key to delete one")
        node = OmegaConf.select(cfg, key, default=None)
        if OmegaConf.is_dict(node) and "_component_" in node and value not in ("None", "null"):
            key += "._component_"
        dotlist.append(f"{key}={'null' if value == 'None' else value}")
    for item in dotlist:
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as e:
            raise ValueError(f"command-line override {item!r}: the value is not YAML ({_yaml_problem(e)})") from None
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))


def _yaml_problem(error: yaml.YAMLError) -> str:
    """``"YAML syntax error: problem (context)"`` of a parser error, on one line."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    return f"YAML syntax error: {problem}" + (f" ({context})" if context else "")


def _delete(cfg: DictConfig, key: str) -> None:
    """Remove the dotted ``key`` from ``cfg``."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    if not OmegaConf.is_dict(parent) or leaf not in parent:
        raise ValueError(f"command-line override ~{key}: the config has no key {key} to delete")
    del parent[leaf]
