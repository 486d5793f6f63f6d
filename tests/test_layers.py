"""The package's layers, checked statically: the imports of every ``omnilong/**/*.py`` and
``recipes/*.py`` (read with ``ast``, function-level imports included) obey the layer rules of
``DESIGN.md``, and no import cycle joins omnilong's subpackages."""

import ast
from pathlib import Path

import pytest

import omnilong

PACKAGE = Path(omnilong.__file__).parent
RECIPES = PACKAGE.parent / "recipes"
# The attention entry point: the one part of omnilong.models that omnilong.parallel may use
# (it swaps the attention core and runs the same kernels inside the ring).
ATTENTION = ("omnilong.models.attention", "omnilong.models.varlen_attention", "omnilong.models._cuda_attention")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _nodes(tree: ast.AST, in_functions: bool):
    """Every node of ``tree``; without those inside function bodies unless ``in_functions``."""
    for child in ast.iter_child_nodes(tree):
        yield child
        if in_functions or not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _nodes(child, in_functions)


def _imports(path: Path, in_functions: bool = True) -> set[str]:
    """The modules ``path`` imports, absolute (``from a import b`` gives ``a.b`` when that is a
    module); with ``in_functions``, the imports inside functions too (run when called)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _nodes(ast.parse(path.read_text(), str(path)), in_functions):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base)
    return found


def _sources() -> dict[str, tuple[Path, set[str]]]:
    files = sorted(PACKAGE.rglob("*.py")) + sorted(RECIPES.glob("*.py"))
    return {_module_name(p): (p, _imports(p)) for p in files}


SOURCES = _sources()


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(module_prefix: str, forbidden, allowed=()) -> list[str]:
    return sorted(
        f"{module} imports {imported}"
        for module, (_, imports) in SOURCES.items()
        if _within(module, [module_prefix])
        for imported in imports
        if _within(imported, forbidden) and not _within(imported, allowed)
    )


def test_parallel_imports_no_model_data_or_checkpoint():
    """omnilong.parallel applies generic mechanisms: of the models it knows only the attention entry point."""
    problems = _violations(
        "omnilong.parallel",
        ["omnilong"],
        ["omnilong.parallel", "omnilong.constants", "omnilong.distributed", *ATTENTION],
    )
    assert not problems, problems


@pytest.mark.parametrize(
    "layer",
    [
        "omnilong.parallel",
        "omnilong.data",
        "omnilong.checkpoint",
        "omnilong.eval",
        "omnilong.generation",
        "omnilong.loss",
        "recipes",
    ],
)
def test_model_code_imports_no_outer_layer(layer):
    """Model code is single-device code: only a family's ``parallelize`` module applies omnilong.parallel."""
    allowed_parallel = [m for m in SOURCES if m.endswith(".parallelize")] if layer == "omnilong.parallel" else []
    problems = [p for p in _violations("omnilong.models", [layer]) if p.split()[0] not in allowed_parallel]
    assert not problems, problems


def test_data_and_loss_import_no_model_parallel_or_checkpoint():
    """Datasets and the loss get what they need of the model from the recipe (its config's values)."""
    outer = ["omnilong.models", "omnilong.parallel", "omnilong.checkpoint", "omnilong.eval", "omnilong.generation"]
    problems = _violations("omnilong.data", outer) + _violations("omnilong.loss", outer + ["omnilong.data"])
    assert not problems, problems


def test_nothing_imports_a_family_private_module_from_outside():
    """Outside a family's package (and the registry, ``omnilong.models.families``), its ``_private`` modules are
    not imported: shared code goes through the family's public functions."""
    problems = sorted(
        f"{module} imports {imported}"
        for module, (_, imports) in SOURCES.items()
        if module != "omnilong.models.families"
        for imported in imports
        if _within(imported, ["omnilong.models"])
        and any(part.startswith("_") for part in imported.split(".")[3:])
        and not _within(module, [".".join(imported.split(".")[:3])])
    )
    assert not problems, problems


def test_ignore_index_is_defined_once_and_imported_from_constants():
    definitions, imports = [], []
    for module, (path, _) in SOURCES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "IGNORE_INDEX" for t in node.targets):
                definitions.append(module)
            if isinstance(node, ast.ImportFrom) and any(a.name == "IGNORE_INDEX" for a in node.names):
                imports.append((module, node.module))
    assert definitions == ["omnilong.constants"]
    assert [i for i in imports if i[1] != "omnilong.constants"] == []


def _layer(module: str) -> str:
    """The node of ``module`` in the subpackage graph: ``omnilong.<subpackage>`` (the attention entry point counts
    as its own), a top-level module, or ``recipes``."""
    if _within(module, ATTENTION):
        return "omnilong.models.attention"
    return ".".join(module.split(".")[:2])


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """One ``a -> b -> ... -> a`` per cycle a depth-first walk of ``graph`` meets."""
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycle_among_subpackages():
    graph: dict[str, set[str]] = {}
    for module, (_, imports) in SOURCES.items():
        for imported in imports:
            if _within(imported, ["omnilong"]) and _layer(imported) != _layer(module):
                graph.setdefault(_layer(module), set()).add(_layer(imported))
    assert not _cycles(graph)


def _packages_run(module: str, imported: str) -> list[str]:
    """The packages whose ``__init__`` importing ``imported`` from ``module`` runs: those above
    ``imported`` that are not above ``module`` too."""
    parts = imported.split(".")
    return [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if not _within(module, [p])]


def test_no_import_cycle_among_modules():
    """Nor among modules at import time (imports inside functions run later), counting the
    ``__init__`` of every package an import goes through (importing ``omnilong.models.attention``
    runs ``omnilong/models/__init__.py``): such a cycle is an ImportError for whichever of its
    modules is imported first."""
    graph = {
        module: {
            i
            for imported in _imports(path, in_functions=False)
            if _within(imported, ["omnilong"])
            for i in [imported, *_packages_run(module, imported)]
        }
        for module, (path, _) in SOURCES.items()
    }
    assert not _cycles(graph)
