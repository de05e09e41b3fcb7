"""The layering that shows the data flow: server and client meet only in ``shared/``.

``server/`` never imports ``fedrec.client`` and ``client/`` never imports ``fedrec.server``
(what they exchange is :mod:`fedrec.shared.federation.contract`); ``shared/`` imports neither, nor
the tools built on top (``simulations/``, the CLI). Every ``.py`` file is parsed with ``ast``, so
an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> its package (pyproject's package-dir) and the packages it must not import
TOOLS = ("fedrec.simulations", "fedrec.cli")
RULES = {
    "server": ("fedrec.server", ("fedrec.client",)),
    "client": ("fedrec.client", ("fedrec.server",)),
    "shared": ("fedrec.shared", ("fedrec.server", "fedrec.client", *TOOLS)),
}


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in ``source`` (a module of ``package``), anywhere in
    the file: ``import a.b``, ``from a import b`` (as ``a.b``, ``b`` may be a module), relative
    imports resolved against ``package``, and ``importlib.import_module("a.b")`` with a literal."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parent, *([base] if base else [])])
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(source: str, package: str, forbidden: tuple[str, ...]) -> list[str]:
    """``line N: module`` for each line that imports a ``forbidden`` package (once per line)."""
    bad: dict[int, str] = {}
    for line, module in imported_modules(source, package):
        if any(module == f or module.startswith(f + ".") for f in forbidden):
            bad.setdefault(line, module)
    return [f"line {line}: {module}" for line, module in sorted(bad.items())]


@pytest.mark.parametrize("folder", sorted(RULES))
def test_folder_does_not_import_the_other_side(folder):
    package, forbidden = RULES[folder]
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no .py files under {folder}/"
    bad = {}
    for path in files:
        rel = path.relative_to(ROOT / folder).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        # a module's package: itself for __init__.py, else its folder
        pkg = ".".join([package, *(parts if path.name == "__init__.py" else parts[:-1])])
        found = violations(path.read_text(encoding="utf-8"), pkg, forbidden)
        if found:
            bad[str(path.relative_to(ROOT))] = found
    assert not bad, f"{folder}/ imports {forbidden} (move the shared part to shared/): {bad}"


@pytest.mark.parametrize(
    "source",
    [
        "import fedrec.client.app",
        "import fedrec.client as c",
        "from fedrec.client.runtime import resolve_data_dir",
        "from fedrec import client",
        "def f():\n    if True:\n        from fedrec.client.app import TRAIN_METRICS\n",
        "class A:\n    def m(self):\n        import fedrec.client\n",
        "from ..client.app import EVAL_METRICS",
        "from .. import client",
        "import importlib\nimportlib.import_module('fedrec.client.app')",
    ],
)
def test_the_check_catches_every_form_of_import(source):
    assert violations(source, "fedrec.server", ("fedrec.client",))


@pytest.mark.parametrize(
    "source",
    [
        "import fedrec.clientele",  # a prefix of the name is not the package
        "from fedrec.shared.federation.contract import TRAIN_METRICS",
        "from . import strategy",
        "from .strategy import FedRecStrategy",
        "x = 'fedrec.client.app:app'",  # a string is not an import
    ],
)
def test_the_check_lets_shared_imports_through(source):
    assert not violations(source, "fedrec.server", ("fedrec.client",))


def _wheel_layout() -> tuple[dict[str, Path], dict[str, list[str]]]:
    """pyproject's packages -> their folders, and its package-data globs."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = tool["package-dir"]
    folders: dict[str, Path] = {}
    for package in tool["packages"]:
        if package in dirs:
            folders[package] = ROOT / dirs[package]
        else:
            parent, _, leaf = package.rpartition(".")
            folders[package] = folders[parent] / leaf
    return folders, tool.get("package-data", {})


def test_every_source_folder_is_a_package_of_the_wheel():
    """A folder of modules missing from ``packages`` works in the checkout (editable install)
    and is silently absent from the wheel."""
    folders, _ = _wheel_layout()
    listed = {f.resolve() for f in folders.values()}
    missing = []
    for root in ("app", "server", "client", "shared", "simulations"):
        for path in (ROOT / root).rglob("*.py"):
            rel = path.relative_to(ROOT).parts
            if "results" in rel or "__pycache__" in rel:  # committed results, not the package
                continue
            if path.parent.resolve() not in listed:
                missing.append(str(path.parent.relative_to(ROOT)))
    assert not missing, f"folders not in pyproject's packages: {sorted(set(missing))}"


def test_the_wheel_carries_the_named_suites():
    """``fedrec suite quick`` outside the checkout reads the suites from the installed package."""
    folders, data = _wheel_layout()
    carried = {
        p.resolve()
        for package, globs in data.items()
        for glob in globs
        for p in folders[package].glob(glob)
    }
    suites = sorted((ROOT / "simulations" / "suites").glob("*.toml"))
    assert suites and all(s.resolve() in carried for s in suites)
