"""The ``omnilong`` command (``ls``, ``cp``, ``run``, ``keys``) and the recipe's command-line parser.

torchtune's ``tune ls`` / ``tune cp`` read a fixed list of torchtune's own recipes
(``torchtune._recipe_registry``) with no way to add one short of patching it, so OmniLong
has its own command with the same verbs; ``omnilong run`` launches the recipe as ``tune run``
does, without importing torchtune.

    omnilong ls                                   # recipes and shipped configs
    omnilong cp tiny/stage1_text my_stage1.yaml   # a config (or the recipe) to edit
    omnilong run [TORCHRUN-OPTIONS] --config tiny/stage1_text [key=value ...]
    omnilong keys [--markdown]                    # every config key, its default and meaning
"""

import argparse
import functools
import gc
import importlib.util
import os
import runpy
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from omnilong.config import keys_markdown, keys_text
from omnilong.config_files import CONFIG_ROOT, load_config, resolve_config, shipped_configs

RECIPE = "omnilong_full"


def _recipe_file() -> Path:
    """The installed ``omnilong_full`` module's source (found without importing it)."""
    return Path(importlib.util.find_spec(RECIPE).origin)


def _ls() -> str:
    configs = list(shipped_configs()) or [f"(none: no configs in {CONFIG_ROOT})"]
    lines = ["RECIPE          CONFIG"]
    lines += [f"{RECIPE if i == 0 else '':<16}{name}" for i, name in enumerate(configs)]
    return "\n".join(lines) + "\n"


def _cp(source: str, destination: str) -> Path:
    """Copy the recipe (``omnilong_full``) or a config to ``destination`` (a file, or a folder to
    copy into); a config copy gets ``.yaml`` when ``destination`` has no suffix.

    Raises:
        FileNotFoundError: an unknown config (with the closest names).
        FileExistsError: ``destination`` exists (nothing is overwritten).
    """
    src = _recipe_file() if source == RECIPE else resolve_config(source)
    dest = Path(destination)
    if dest.is_dir():
        dest = dest / src.name
    elif not dest.suffix:
        dest = dest.with_suffix(src.suffix)
    if dest.exists():
        raise FileExistsError(f"{dest} exists; choose another name or remove it first")
    shutil.copyfile(src, dest)
    return dest


def _run(args: list[str]) -> int:
    """``omnilong run [TORCHRUN-OPTIONS] --config <config> [overrides]``: what ``tune run
    [TORCHRUN-OPTIONS] omnilong_full --config <config> [overrides]`` does, without importing
    torchtune (about 3 s). With any torchrun option the recipe runs under torchrun (standalone
    unless a rendezvous endpoint is given) and a failed rank gives status 1; else the recipe runs
    in this process, which exits with its status. With ``--dry-run`` the recipe runs in this
    process as rank 0 of the job the torchrun options describe (:mod:`omnilong.dry_run`)."""
    if "--config" not in args and {"-h", "--help"} & set(args):
        print(
            "usage: omnilong run [TORCHRUN-OPTIONS] --config <config> [--dry-run [DRY-RUN-OPTIONS]] "
            "[key=value ...]\n\n--dry-run: the job's setup and steps at full size on this CPU (no GPU, no "
            "data, no weights); its options: `python -m omnilong_full --help`\n\n"
            "<config>: a YAML path or a shipped config name (`omnilong ls`); config keys (default, meaning):\n"
            + keys_text(),
            end="",
        )
        return 0
    if "--config" not in args or args.index("--config") + 1 >= len(args):
        raise ValueError("omnilong run needs --config <config> (`omnilong ls` lists the shipped ones)")
    at = args.index("--config")
    recipe_args = ["--config", str(resolve_config(args[at + 1])), *args[at + 2 :]]
    sys.path.append(os.getcwd())  # as tune run does: components in the working directory import
    if "--dry-run" in recipe_args:  # one process stands for the job torchrun would start
        if args[:at]:
            recipe_args += ["--world-size", str(_torchrun_world_size(args[:at]))]
    elif args[:at]:
        return _run_torchrun([*args[:at], "--module", RECIPE, *recipe_args])
    sys.argv = [RECIPE, *recipe_args]
    runpy.run_module(RECIPE, run_name="__main__")  # exits with the recipe's status
    return 0


def _torchrun_world_size(options: list[str]) -> int:
    """The ranks the torchrun ``options`` would start: ``--nproc_per_node`` x ``--nnodes`` (the
    most nodes of a ``MIN:MAX`` range).

    Raises:
        ValueError: a count that is not a number (``--nproc_per_node gpu`` counts this machine's
            GPUs, which a dry run cannot know).
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--nproc_per_node", "--nproc-per-node", default="1")
    parser.add_argument("--nnodes", default="1")
    known, _ = parser.parse_known_args(options)
    nodes = known.nnodes.split(":")[-1]
    if not (known.nproc_per_node.isdigit() and nodes.isdigit()):
        raise ValueError(
            f"a dry run needs numbers for --nproc_per_node and --nnodes, got {known.nproc_per_node!r} "
            f"and {known.nnodes!r}"
        )
    return int(known.nproc_per_node) * int(nodes)


def _run_torchrun(argv: list[str]) -> int:
    """torchrun with ``argv``; standalone (a rendezvous of its own) without ``--rdzv-endpoint``.
    Returns 1 when a rank failed, after torchrun's table of the failed ranks and exit codes
    (each rank has printed its own error above it), without the launcher's traceback."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
    from torch.distributed.run import get_args_parser, run

    gc.freeze()  # the launcher's imports live to its end: its collections (and the one at exit) skip them
    args = get_args_parser().parse_args(argv)
    if not args.rdzv_endpoint:
        args.standalone = True
    try:
        record(run)(args)  # record: a failed rank's error file reaches an enclosing launcher's, as under tune run
    except ChildFailedError as e:
        print(f"omnilong run: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``omnilong`` console script."""
    parser = argparse.ArgumentParser(
        prog="omnilong", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("ls", help="list the recipe and the shipped configs")
    cp = verbs.add_parser("cp", help="copy a shipped config (or the recipe) to edit")
    cp.add_argument("source", help="config name (tiny/stage1_text) or omnilong_full")
    cp.add_argument("destination", help="file or folder")
    verbs.add_parser(
        "run", help="tune run omnilong_full: [TORCHRUN-OPTIONS] --config <config> [key=value ...]", add_help=False
    )
    keys = verbs.add_parser("keys", help="every config key with its default and meaning")
    keys.add_argument("--markdown", action="store_true", help="as the table of docs/configuration.md")
    args, rest = parser.parse_known_args(argv)
    if args.verb != "run" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.verb == "ls":
            print(_ls(), end="")
        elif args.verb == "cp":
            print(f"copied to {_cp(args.source, args.destination)}")
        elif args.verb == "keys":
            print(keys_markdown() if args.markdown else keys_text(), end="")
        else:
            return _run(rest)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"omnilong {args.verb}: error: {e}", file=sys.stderr)
        return 1
    return 0


def _add_dry_run_arguments(parser: argparse.ArgumentParser) -> None:
    from omnilong.memory_plan import GPUS
    from omnilong.models.named import NAMED_MODELS

    group = parser.add_argument_group(
        "dry run", "the run's setup and a few steps at full size on this CPU, on fake tensors (no GPU, no data)"
    )
    group.add_argument("--dry-run", action="store_true", help="dry-run the config instead of training")
    group.add_argument("--world-size", type=int, default=1, help="ranks of the job to plan for (default 1)")
    group.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="the GPU to fit (default h100)")
    group.add_argument(
        "--gpu-memory", type=float, metavar="GIB", help="the GPU's memory in GiB, if not the named GPU's"
    )
    group.add_argument("--mfu", type=float, default=0.4, help="fraction of the GPU's peak the step time is stated at")
    group.add_argument("--steps", type=int, default=2, help="training steps to trace (default 2)")
    group.add_argument(
        "--model", choices=sorted(NAMED_MODELS), help="shapes to use when checkpoint_dir is not on this machine"
    )
    group.add_argument("--no-longest", action="store_true", help="skip the search for the longest max_seq_len")


def _dry_run_settings(args: argparse.Namespace, config: Path):
    """The :class:`~omnilong.dry_run.DryRunSettings` of ``--dry-run``'s arguments, or None without it."""
    if not args.dry_run:
        return None
    from dataclasses import replace

    from omnilong.dry_run import DryRunSettings
    from omnilong.memory_plan import GPUS

    for name in ("world_size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {args.mfu}")
    gpu = GPUS[args.gpu]
    if args.gpu_memory is not None:
        gpu = replace(gpu, name=f"{args.gpu_memory:g} GiB GPU", memory_gib=args.gpu_memory)
    return DryRunSettings(args.world_size, gpu, args.mfu, args.steps, args.model, not args.no_longest, config)


def parse(recipe_main: Callable[..., int]) -> Callable[[], None]:
    """The recipe's command line for its ``main``: ``--config <config> [key=value | ~key ...]``
    (:func:`load_config`), where ``<config>`` may name a shipped config (:func:`resolve_config`)
    and ``--help`` lists every config key; ``--dry-run`` and its options give ``main`` its
    ``dry_run`` settings. Errors in the command line end the process with status 1 and one
    line; ``main``'s return value is the exit status."""

    @functools.wraps(recipe_main)
    def wrapper() -> None:
        parser = argparse.ArgumentParser(
            description=recipe_main.__doc__,
            epilog="config keys (default, meaning):\n" + keys_text(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument("--config", required=True, help="a YAML path or a shipped config name (`omnilong ls`)")
        _add_dry_run_arguments(parser)
        args, overrides = parser.parse_known_args(sys.argv[1:])
        try:
            flags = [arg for arg in overrides if arg.startswith("--")]
            if flags:
                raise ValueError(
                    f"unknown option {flags[0]}: the recipe takes --config, key=value overrides and the dry run's options"
                )
            config = resolve_config(args.config)
            cfg = load_config(config, overrides)
            dry_run = _dry_run_settings(args, config)
        except (ValueError, FileNotFoundError) as e:
            print(f"{RECIPE}: error: {e}", file=sys.stderr)
            sys.exit(1)
        gc.freeze()  # the modules' objects live to the end: later collections (and the one at exit) skip them
        sys.exit(recipe_main(cfg, dry_run=dry_run))

    return wrapper
