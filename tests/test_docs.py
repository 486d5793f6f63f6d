"""The README and the manual (docs/*.md) state facts the code can check: every command in a
code block names a tool, a config and flags that exist (each tool's own argparse parser, taken
in-process, parses the command's arguments; configs go through the config loader and key
checks), and every relative link and anchor resolves."""

import argparse
import importlib.util
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from omnilong.config import validate_config
from omnilong.config_files import load_config, resolve_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RECIPE = "omnilong_full"
# Commands of other programs the pages use as they are; a command starting with anything
# else (or with a path that does not exist) fails the test.
EXTERNAL = {"hf", "source", "ruff", "pip"}
KNOWN = {"python", "torchrun", "tune", "omnilong", "bash", "sbatch", *EXTERNAL}
FENCE = re.compile(r"^```(\w*)\s*$")


def _blocks(page: Path) -> Iterator[tuple[str, list[str]]]:
    """Each fenced code block of ``page``: its language and its lines."""
    lang, lines = None, []
    for line in page.read_text().splitlines():
        match = FENCE.match(line)
        if match and lang is None:
            lang, lines = match.group(1), []
        elif line.startswith("```") and lang is not None:
            yield lang, lines
            lang = None
        elif lang is not None:
            lines.append(line)


def _commands(lines: list[str], known_only: bool) -> Iterator[list[str]]:
    """The commands of a block's lines: continuations joined, comments dropped, split at ``&&``;
    ``<placeholder>`` becomes one word and the ``[...]`` of optional arguments is dropped.
    ``known_only``: only lines that start with a known program (a plain block also shows
    output: tables, logs)."""
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    text = re.sub(r"<[^>|]+>", "PLACEHOLDER", re.sub(r" \.\.\.\]", "]", text))
    for line in text.splitlines():
        if known_only and line.split()[:1] not in [[k] for k in KNOWN]:
            continue
        words = [w.strip("[]") for w in shlex.split(line, comments=True)]
        words = [w for w in words if w]
        command: list[str] = []
        for word in [*words, "&&"]:
            if word == "&&":
                if command:
                    yield command
                command = []
            else:
                command.append(word)


def _all_commands() -> list[tuple[str, list[str]]]:
    """Every command of every page: all of a bash block; in a plain block (which also shows
    output: tables, logs) the lines that start with a known program."""
    found = []
    for page in PAGES:
        for lang, lines in _blocks(page):
            if lang in ("bash", "sh", ""):
                for command in _commands(lines, known_only=not lang):
                    found.append((f"{page.relative_to(ROOT)}: {shlex.join(command)}", command))
    return found


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _parser_of(main) -> argparse.ArgumentParser:
    """The argparse parser ``main()`` builds, taken when it starts parsing (nothing runs)."""

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = capture
    try:
        main()
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
    raise AssertionError(f"{main} parsed no command line")


_TOOL_PARSERS: dict[Path, argparse.ArgumentParser] = {}


def _tool_parser(path: Path) -> argparse.ArgumentParser:
    if path not in _TOOL_PARSERS:
        spec = importlib.util.spec_from_file_location(f"docs_checked_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _TOOL_PARSERS[path] = _parser_of(module.main)
    return _TOOL_PARSERS[path]


def _parse(parser: argparse.ArgumentParser, args: list[str], known: bool = False):
    """``parser``'s parse of ``args``; its error (argparse exits) becomes an AssertionError."""
    try:
        return parser.parse_known_args(args) if known else parser.parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"{parser.prog} refuses {shlex.join(args)}") from e


def _check_recipe(torchrun_args: list[str], recipe_args: list[str]) -> None:
    """torchrun's options, then the recipe's: ``--config`` resolves and loads with the overrides,
    and the result passes the key checks. A config the pages make with ``omnilong cp``
    (``my_*.yaml``) stands in as the shipped config it copies."""
    _parse(get_args_parser(), [*torchrun_args, "train.py"])
    if RECIPE not in sys.modules:
        sys.path.insert(0, str(ROOT / "recipes"))
    import omnilong_full

    args, overrides = _parse(_parser_of(omnilong_full.recipe_main), recipe_args, known=True)
    assert not [o for o in overrides if o.startswith("--")], f"unknown recipe flags in {overrides}"
    name = "tiny/stage1_text" if args.config.startswith("my_") else args.config
    validate_config(load_config(resolve_config(name), overrides))


def _check(command: list[str]) -> None:
    head, *rest = command
    if head in EXTERNAL:
        return
    if head == "bash":
        assert (ROOT / rest[0]).is_file(), f"no script {rest[0]}"
    elif head == "sbatch":
        script = next(w for w in rest if w.startswith("launch/"))
        assert (ROOT / script).is_file(), f"no script {script}"
        after = rest[rest.index(script) + 1 :]
        validate_config(load_config(resolve_config(after[0]), after[1:]))
    elif head == "tune":
        assert rest[0] == "run" and RECIPE in rest, "tune run ... omnilong_full ..."
        at = rest.index(RECIPE)
        _check_recipe(rest[1:at], rest[at + 1 :])
    elif head == "omnilong":
        from omnilong import cli

        if rest[0] == "run":
            at = rest.index("--config")
            _check_recipe(rest[1:at], rest[at:])
        else:
            _parse(_parser_of(cli.main), rest)
            if rest[0] == "cp" and rest[1] != RECIPE:
                resolve_config(rest[1])
    elif head == "python" and rest[:2] == ["-m", "pytest"]:
        paths = [w for w in rest[2:] if w.startswith("tests")]
        assert all((ROOT / p).exists() for p in paths), f"no such tests in {paths}"
    elif head == "python" and rest[:2] == ["-m", RECIPE]:
        _check_recipe([], rest[2:])
    else:
        assert head in ("python", "torchrun"), f"unknown command {head}"
        at = next(i for i, w in enumerate(rest) if w.endswith(".py"))
        if head == "torchrun":
            _parse(get_args_parser(), rest[: at + 1])
        assert (ROOT / rest[at]).is_file(), f"no tool {rest[at]}"
        _parse(_tool_parser(ROOT / rest[at]), rest[at + 1 :])


COMMANDS = _all_commands()


@pytest.mark.parametrize("command", [c for _, c in COMMANDS], ids=[where for where, _ in COMMANDS])
def test_every_command_in_the_docs_names_a_tool_config_and_flags_that_exist(command):
    _check(command)


def test_the_command_check_refuses_what_does_not_exist():
    """The check above can fail: a misspelled flag, tool, config or key is refused."""
    good = ["omnilong", "run", "--nproc_per_node", "2", "--config", "tiny/stage1_text", "max_steps=10"]
    _check(good)
    bad = [
        ["omnilong", "run", "--nproc_per_node", "2", "--config", "tiny/stage1_txt"],
        ["omnilong", "run", "--nproc_per_node", "2", "--config", "tiny/stage1_text", "max_step=10"],
        ["omnilong", "run", "--nprocs_per_node", "2", "--config", "tiny/stage1_text"],
        ["omnilong", "run", "--config", "tiny/stage1_text", "--dry-runs"],
        ["python", "tools/prepare_data.py", "--kind", "text", "--tokeniser", "t", "--output", "o", "a.jsonl"],
        ["python", "tools/no_such_tool.py"],
        ["torchrun", "--nproc_per_node", "8", "tools/evaluate.py", "needle", "--checkpoint", "c", "--output", "o"],
        ["make", "all"],
    ]
    for command in bad:
        with pytest.raises((AssertionError, ValueError, FileNotFoundError)):
            _check(command)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    in_code = False
    for line in page.read_text().splitlines():
        in_code ^= line.startswith("```")
        if not in_code and (match := re.match(r"#{1,6} (.+)", line)):
            slug = _slug(match.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(page: Path) -> Iterator[str]:
    in_code = False
    for line in page.read_text().splitlines():
        in_code ^= line.startswith("```")
        if not in_code:
            yield from re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line))


LINKS = [(page, target) for page in PAGES for target in _links(page) if not re.match(r"\w+:", target)]


@pytest.mark.parametrize("page,target", LINKS, ids=[f"{p.relative_to(ROOT)}->{t}" for p, t in LINKS])
def test_every_relative_link_and_anchor_resolves(page, target):
    path, _, anchor = target.partition("#")
    linked = (page.parent / path).resolve() if path else page
    assert linked.exists(), f"{page.name}: {target}: no such file"
    if anchor:
        assert anchor in _anchors(linked), f"{page.name}: {target}: no such heading in {linked.name}"


def test_anchors_follow_github():
    """Anchors as GitHub makes them (checked by hand on rendered pages)."""
    assert _slug("Dry run: will it fit, and how fast") == "dry-run-will-it-fit-and-how-fast"
    assert _slug("Training Qwen2.5-VL-7B") == "training-qwen25-vl-7b"
    assert _slug("Stage 3: video chat") == "stage-3-video-chat"


def test_readme_is_short_and_every_page_is_in_its_manual():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"the README's manual does not list docs/{page.name}"
