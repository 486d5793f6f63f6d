"""The shipped configs: where they are, their names, and ``--config`` values that name one.

Configs live in the checkout's ``configs/`` folder, next to the ``omnilong`` package; the
editable install of ``scripts/setup.sh`` (``pip install -e``) reads them there. A
non-editable install (``pip install .``) does not ship them: give ``--config`` a path.
"""

import difflib
from pathlib import Path

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
