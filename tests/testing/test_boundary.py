"""``omnilong.testing`` (tiny checkpoints, tokenizer, demo data) is for tests, tools, the demo and
the tiny configs: no library module imports it. Checked statically over every module's AST."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "omnilong"


def _imports_testing(source: str) -> list[int]:
    """The line numbers of the imports of ``omnilong.testing`` (any form) in ``source``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        if any(name == "omnilong.testing" or name.startswith("omnilong.testing.") for name in names):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_check_finds_every_form_of_the_import():
    source = (
        "import omnilong.testing\nfrom omnilong.testing.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl\n"
        "from omnilong import testing\ndef f():\n    import omnilong.testing.stdlib_data as s\n"
        "from omnilong.data import chat_dataset\nimport omnilong.testingx\n"
    )
    assert _imports_testing(source) == [1, 2, 3, 5]


def test_no_library_module_imports_omnilong_testing():
    modules = [p for p in PACKAGE.rglob("*.py") if "testing" not in p.relative_to(PACKAGE).parts[:1]]
    assert len(modules) > 50
    offenders = [f"{p.relative_to(PACKAGE.parent)}:{line}" for p in modules for line in _imports_testing(p.read_text())]
    assert offenders == [], "library modules import omnilong.testing: " + ", ".join(offenders)
