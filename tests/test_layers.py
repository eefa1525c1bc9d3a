"""The package layers stay one-way (issue 13): the import-linter contracts of pyproject.toml hold,
function-level imports included, and no module imports another module's private ``_name``.
Pure static analysis: no Ray, no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("pipeline", "dino_model", "jobs", "bench")


def test_import_linter_contracts_hold():
    # `lint-imports` in its own process: it reconfigures logging (dictConfig), which would
    # silence the loggers of every test after this one
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command as c; c()",
            "--no-cache",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.fixture(scope="module")
def graph():
    """The import graph import-linter checks the contracts on (grimp's)."""
    import grimp

    return grimp.build_graph("pipeline", cache_dir=None)


def test_function_level_imports_are_checked(graph):
    """A lazy import inside a function is an edge of the graph the contracts are checked on."""
    # pipeline.commands.train imports the training run inside ``run`` only
    assert graph.direct_import_exists(
        importer="pipeline.commands.train", imported="pipeline.training_run"
    )


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(node: ast.AST, importer: str, is_package: bool) -> list[str]:
    """The dotted names an import statement reaches, relative imports resolved."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom) or node.module == "__future__":
        return []
    base = node.module or ""
    if node.level:
        package = importer.split(".")
        package = package if is_package else package[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{a.name}" for a in node.names]


def private_imports(root: Path = ROOT) -> list[str]:
    """``file:line: name`` for every import of one of our private names (a ``_x`` module or
    attribute, dunders aside) from outside the module or package that owns it:
    ``from pkg.mod import _x`` anywhere but inside ``pkg.mod``, ``pkg._mod`` anywhere but inside
    ``pkg``."""
    found = []
    for top in SCANNED:
        for path in sorted((root / top).rglob("*.py")):
            importer = _module_name(path, root)
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):  # module, function and class bodies alike
                for name in _imported_names(node, importer, path.name == "__init__.py"):
                    parts = name.split(".")
                    if parts[0] not in SCANNED:  # our own code only: not ray._private
                        continue
                    for i, part in enumerate(parts):
                        if part.startswith("_") and not part.startswith("__"):
                            owner = ".".join(parts[:i])
                            if importer != owner and not importer.startswith(owner + "."):
                                found.append(f"{path.relative_to(root)}:{node.lineno}: {name}")
                            break
    return found


def test_no_module_imports_another_modules_private_name():
    assert private_imports() == []


def test_the_private_name_check_sees_function_level_imports(tmp_path):
    pkg = tmp_path / "pipeline"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from pipeline.a._impl import thing\n")
    (pkg / "a" / "_impl.py").write_text(
        "def thing():\n    return 1\n\n\ndef _helper():\n    pass\n"
    )
    (pkg / "b.py").write_text(
        "def f():\n    from pipeline.a._impl import _helper\n    from pipeline.a import thing\n"
    )
    assert private_imports(tmp_path) == ["pipeline/b.py:2: pipeline.a._impl._helper"]


@pytest.mark.parametrize("layer", ["pipeline.train", "pipeline.evaluate"])
def test_training_and_evaluation_never_import_each_other(graph, layer):
    """The contract's core, spelt out: the two sides meet only at ``pipeline.checkpoints``."""
    other = {"pipeline.train": "pipeline.evaluate", "pipeline.evaluate": "pipeline.train"}[layer]
    chains = graph.find_shortest_chains(importer=layer, imported=other, as_packages=True)
    assert not chains, chains
