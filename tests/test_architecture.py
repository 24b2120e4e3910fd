"""Architecture rules (docs/ARCHITECTURE.md, section 1): imports point one way, the command line starts
without torch, and modules stay short."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mmcli

ROOT = Path(mmcli.__file__).parent  # the mmcli package folder
MAX_LINES = 500


def _is_module(name: str, root: Path = ROOT) -> bool:
    """Whether ``name`` (``mmcli.a.b``) is a module or package of the mmcli tree at ``root``."""
    parts = name.split(".")[1:]
    if not parts:
        return False
    return root.joinpath(*parts[:-1], f"{parts[-1]}.py").is_file() or root.joinpath(*parts).is_dir()


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` imports, at any depth: ``import a.b`` and ``from a.b import c`` give ``a.b``;
    ``from mmcli import c`` also gives ``mmcli.c``, and ``from mmcli.pkg import c`` gives ``mmcli.pkg.c``
    where ``c`` is a module or package of the tree at ``root`` (``mmcli/pkg/c.py`` or ``mmcli/pkg/c/``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                if node.module == "mmcli" or (node.module.startswith("mmcli.") and _is_module(name, root)):
                    names.add(name)
    return names


def _banned(names: set[str], prefixes: tuple[str, ...]) -> set[str]:
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)}


def test_imports_point_one_way():
    rules = {
        "io": ("torch", "mmcli.data", "mmcli.models", "mmcli.cli", "mmcli.inference", "mmcli.batch"),
        "models": ("mmcli.io", "mmcli.cli", "mmcli.data", "mmcli.inference"),
        "training": ("mmcli.inference", "mmcli.batch", "mmcli.predict", "mmcli.cli"),
    }
    for sub, banned in rules.items():
        for path in (ROOT / sub).glob("*.py"):
            assert not _banned(_imports(path), banned), path
    for name in ("errors.py", "config.py", "data/folders.py", "metrics.py"):
        if (ROOT / name).is_file():
            assert not _banned(_imports(ROOT / name), ("torch", "mmcli.cli", "mmcli.inference")), name
    for path in ROOT.rglob("*.py"):
        if "cli" not in path.relative_to(ROOT).parts and path.name != "__main__.py":
            assert not _banned(_imports(path), ("mmcli.cli", "typer", "rich")), path


def test_import_scan_sees_nested_and_aliased_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    import torch.nn as tnn\n    from mmcli.cli.common import say\n")
    assert _banned(_imports(src), ("torch", "mmcli.cli")) == {"torch.nn", "mmcli.cli.common"}


def test_import_scan_sees_modules_imported_from_their_package(tmp_path):
    # ``from mmcli import batch`` imports mmcli.batch, not just mmcli; names that are not modules stay out
    src = tmp_path / "m.py"
    src.write_text("from mmcli import batch, __version__ as v\nfrom mmcli.io import readers\n"
                   "from mmcli.io.readers import read_radiograph\nfrom mmcli import cli\n")
    names = _imports(src)
    assert {"mmcli", "mmcli.batch", "mmcli.io", "mmcli.io.readers", "mmcli.cli"} <= names
    assert "mmcli.io.readers.read_radiograph" not in names
    assert _banned(names, ("mmcli.batch", "mmcli.cli", "mmcli.io.readers")) == {
        "mmcli.batch", "mmcli.cli", "mmcli.io.readers"}


def test_the_package_has_no_relative_imports():
    # the import scan does not read relative imports: a banned module imported that way would pass unseen
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level], path


def test_the_command_line_starts_without_torch():
    # --help and --version answer at once: torch, numpy and the readers load when a command runs
    code = "import sys, mmcli.cli; print(sorted(m for m in ('torch', 'numpy', 'PIL', 'pydicom') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_modules_outside_the_command_line_stay_under_500_lines():
    long = {}
    for path in sorted(ROOT.rglob("*.py")):
        if "cli" in path.relative_to(ROOT).parts:
            continue
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            long[str(path.relative_to(ROOT))] = lines
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"
