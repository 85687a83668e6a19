"""The house's layering rules, checked on the source: they fail the moment someone breaks them."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["api", "model", "trainers", "serving", "operator", "storage", "cli"]
# package -> flashops subpackages it must never import
FORBIDDEN = {
    "api": {"model", "trainers", "serving", "operator", "storage", "cli"},
    "model": {"trainers", "serving", "operator", "storage", "cli"},
    "storage": {"model", "trainers", "serving", "operator", "cli"},
    "trainers": {"operator", "serving", "cli"},
    "serving": {"operator", "trainers", "cli"},
    "operator": {"model", "trainers", "serving", "cli"},
}


def imports_of(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_point_one_way(package):
    bad = []
    for f in (ROOT / package).rglob("*.py"):
        for line, mod in imports_of(f):
            parts = mod.split(".")
            if parts[0] == "flashops" and len(parts) > 1 and parts[1] in FORBIDDEN[package]:
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", ["api", "operator"])
def test_no_torch_in_the_controller_or_the_spec_layer(package):
    bad = [f"{f.relative_to(ROOT)}:{line}" for f in (ROOT / package).rglob("*.py")
           for line, mod in imports_of(f) if mod.split(".")[0] in ("torch", "torchtitan", "torchao")]
    assert not bad, bad


def test_operator_package_has_no_init_so_it_cannot_shadow_the_stdlib():
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_import_operator_from_the_repo_root_is_the_stdlib():
    code = "import operator, sys; print(operator.__file__); print(operator.itemgetter(1)([5, 7]))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    file, value = out.stdout.split()
    assert Path(file).parent != ROOT / "operator" and "site-packages" not in file and value == "7"
    out = subprocess.run([sys.executable, "-c", "import flashops.api.spec, flashops.operator; print('ok')"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_importing_the_operator_and_the_cli_loads_no_torch():
    code = (
        "import sys, importlib, pkgutil, flashops.operator as op\n"
        "for m in pkgutil.walk_packages(op.__path__, 'flashops.operator.'):\n"
        "    importlib.import_module(m.name)\n"
        "import flashops.cli.app\n"
        "heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'torchtitan'))\n"
        "print(heavy[:5])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
