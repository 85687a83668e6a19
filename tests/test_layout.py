"""The house's layering rules, checked on the source: they fail the moment someone breaks them."""
import ast
import functools
import re
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


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_names_defined(tree: ast.AST) -> set[str]:
    """Private names a module defines (functions, classes, methods, module/class attributes)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _private(node.name):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(leaf.id for leaf in ast.walk(t) if isinstance(leaf, ast.Name) and _private(leaf.id))
                names.update(leaf.attr for leaf in ast.walk(t) if isinstance(leaf, ast.Attribute) and _private(leaf.attr))
    return names


def _private_definitions() -> dict[str, set[str]]:
    """package -> private names its modules define."""
    return {package: set().union(*(_private_names_defined(ast.parse(f.read_text(), filename=str(f)))
                                   for f in (ROOT / package).rglob("*.py")))
            for package in PACKAGES}


def private_uses_across_packages(package: str, defined: dict[str, set[str]]) -> list[str]:
    """`from flashops.X._mod import ...`, `from flashops.X.mod import _name`, `alias._name` on something imported
    from another package, and `obj._name` where only another package defines `_name` (e.g. model._head)."""
    foreign = set().union(*(names for p, names in defined.items() if p != package)) - defined[package]
    bad = []
    for f in (ROOT / package).rglob("*.py"):
        tree = ast.parse(f.read_text(), filename=str(f))
        from_other: set[str] = set()  # local names bound to another package's modules or objects
        for node in ast.walk(tree):
            where = f"{f.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                parts = node.module.split(".")
                if parts[0] != "flashops" or len(parts) < 2 or parts[1] == package:
                    continue
                if any(_private(p) for p in parts[2:]):
                    bad.append(f"{where} imports the private module {node.module}")
                for a in node.names:
                    if _private(a.name):
                        bad.append(f"{where} imports {node.module}.{a.name}")
                    from_other.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if parts[0] == "flashops" and len(parts) > 1 and parts[1] != package:
                        if any(_private(p) for p in parts[2:]):
                            bad.append(f"{where} imports the private module {a.name}")
                        if a.asname:
                            from_other.add(a.asname)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                base = node.value
                where = f"{f.relative_to(ROOT)}:{node.lineno}"
                if isinstance(base, ast.Name) and base.id in from_other:
                    bad.append(f"{where} uses {base.id}.{node.attr}, private to another package")
                elif node.attr in foreign and not (isinstance(base, ast.Name) and base.id in ("self", "cls")):
                    bad.append(f"{where} uses .{node.attr}, which only another package defines")
    return bad


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_uses_another_packages_private_names(package):
    """Make public what is shared (issue 13): a private name is its package's to change."""
    bad = private_uses_across_packages(package, _private_definitions())
    assert not bad, "\n".join(bad)


def test_the_private_name_check_catches_each_form(tmp_path, monkeypatch):
    pkgs = {"model": "class M:\n    def _head(self, h):\n        return h\n_TABLE = 1\n",
            "serving": ("from flashops.model import _compat as c\nfrom flashops.model.m import _TABLE\n"
                        "import flashops.model.m as mm\n\n"
                        "def f(backend):\n    return backend.model._head(mm._TABLE)\n")}
    for name, text in pkgs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.py").write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", list(pkgs))
    bad = private_uses_across_packages("serving", _private_definitions())
    assert any("imports flashops.model._compat" in b or "flashops.model._compat" in b for b in bad), bad
    assert any("flashops.model.m._TABLE" in b for b in bad), bad
    assert any("mm._TABLE" in b for b in bad) and any("._head" in b for b in bad), bad
    assert private_uses_across_packages("model", _private_definitions()) == []


# ------------------------------------------------------------- issue 13: workarounds in one place, one of each
MINIO_COMPAT = "storage/_minio_compat.py"
WORKAROUND_MODULES = ["model/torchtitan_compat.py", MINIO_COMPAT]
HOME_MODULE = "api/home.py"
SAMPLER_MODULE = "model/sampling.py"


def _sources() -> tuple[tuple[str, ast.Module], ...]:
    """(path relative to ROOT, parsed module) for every product module."""
    return _parse_all(ROOT, tuple(PACKAGES))


@functools.lru_cache(maxsize=4)
def _parse_all(root: Path, packages: tuple[str, ...]) -> tuple[tuple[str, ast.Module], ...]:
    return tuple((f.relative_to(root).as_posix(), ast.parse(f.read_text(), filename=str(f)))
                 for package in packages for f in sorted((root / package).rglob("*.py")))


def _minio_private_names() -> set[str]:
    """The private names the installed minio defines (`_upload_part`, `_build_headers`, ...), from its source."""
    import importlib.util

    spec = importlib.util.find_spec("minio")
    assert spec and spec.submodule_search_locations, "minio is a dependency (pyproject.toml)"
    return set().union(*(_private_names_defined(ast.parse(f.read_text()))
                         for loc in spec.submodule_search_locations for f in Path(loc).rglob("*.py")))


def minio_private_uses(minio_private: set[str]) -> list[str]:
    """Outside storage/_minio_compat.py: `from minio.x import _y`, `import minio._x`, `<minio name>._x`, and
    `obj._x` where minio defines `_x` and the module's own package does not (the compat module aside)."""
    sources = _sources()
    own: dict[str, set[str]] = {}
    for rel, tree in sources:
        if rel != MINIO_COMPAT:
            own.setdefault(rel.split("/")[0], set()).update(_private_names_defined(tree))
    bad = []
    for rel, tree in sources:
        if rel == MINIO_COMPAT:
            continue
        foreign = minio_private - own.get(rel.split("/")[0], set())
        from_minio: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "minio":
                if any(_private(p) for p in node.module.split(".")) or any(_private(a.name) for a in node.names):
                    bad.append(f"{rel}:{node.lineno} imports minio's private {node.module}")
                from_minio.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "minio":
                        if any(_private(p) for p in a.name.split(".")):
                            bad.append(f"{rel}:{node.lineno} imports minio's private {a.name}")
                        from_minio.add(a.asname or a.name.split(".")[0])
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                if isinstance(node.value, ast.Name) and node.value.id in from_minio:
                    bad.append(f"{rel}:{node.lineno} uses minio's private {node.value.id}.{node.attr}")
                elif node.attr in foreign:
                    bad.append(f"{rel}:{node.lineno} uses .{node.attr}, private to minio")
    return bad


def minio_compat_importers() -> list[str]:
    """Modules that import storage/_minio_compat.py, in any spelling (absolute, `from pkg import`, relative)."""
    found = []
    for rel, tree in _sources():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            if any("_minio_compat" in n.split(".") for n in names):
                found.append(rel)
    return sorted(set(found))


def test_minio_private_api_is_used_only_in_its_compat_module():
    minio_private = _minio_private_names()
    compat = ast.parse((ROOT / MINIO_COMPAT).read_text())
    reached = {n.attr for n in ast.walk(compat) if isinstance(n, ast.Attribute) and n.attr in minio_private}
    assert {"_upload_part", "_build_headers"} <= reached, reached  # the scan knows what the compat module calls
    bad = minio_private_uses(minio_private)
    assert not bad, "\n".join(bad)


def test_only_the_s3_backend_imports_the_minio_compat_module():
    assert minio_compat_importers() == ["storage/backends.py"]


def workaround_problems(path: Path) -> list[str]:
    """The header of a workarounds module: numbered entries 1..n, each `name`: why ... "Remove when" ...,
    whose backticked names (before the first colon) are defined in the module."""
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree) or ""
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    entries = re.findall(r"^(\d+)\. (.*?)(?=^\d+\. |\Z)", doc, flags=re.M | re.S)
    if not entries:
        return [f"{path.name}: no numbered workarounds in the module docstring"]
    problems = []
    if [int(n) for n, _ in entries] != list(range(1, len(entries) + 1)):
        problems.append(f"{path.name}: entries are numbered {[n for n, _ in entries]}")
    for number, text in entries:
        head, _, body = text.partition(":")
        names = re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", head)
        why, remove, when = " ".join(body.split()).partition("Remove when ")
        if not names:
            problems.append(f"{path.name} {number}: does not start with the `name` it works around in")
        problems += [f"{path.name} {number}: `{n}` is not defined in the module" for n in names if n not in defined]
        if len(why.split()) < 15:
            problems.append(f"{path.name} {number}: does not say why ({why!r})")
        if not remove or len(when.split()) < 3:
            problems.append(f"{path.name} {number}: does not say when it can go ('Remove when ...')")
    return problems


@pytest.mark.parametrize("module", WORKAROUND_MODULES)
def test_every_workaround_says_why_and_when_it_can_go(module):
    problems = workaround_problems(ROOT / module)
    assert not problems, "\n".join(problems)


def flashops_home_readers() -> list[str]:
    """Modules other than api/home.py that spell the FLASHOPS_HOME variable or its default (~/.flashops)."""
    spelled = {"FLASHOPS_HOME", ".flashops", "~/.flashops"}
    return [f"{rel}:{n.lineno} {n.value!r}" for rel, tree in _sources() if rel != HOME_MODULE
            for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in spelled]


def test_only_api_home_knows_where_flashops_home_is():
    assert flashops_home_readers() == []


def plural_spellings() -> list[str]:
    """The kinds' plurals written anywhere but flashops.api.spec.PLURALS: a second kind/plural table."""
    from flashops.api import spec as S

    plurals = set(S.PLURALS.values())
    return [f"{rel}:{n.lineno} {n.value!r}" for rel, tree in _sources() if rel != "api/spec.py"
            for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in plurals]


def test_one_kind_plural_table():
    from flashops.api import spec as S

    assert set(S.PLURALS) == set(S.KINDS)
    assert plural_spellings() == []
    uses = {rel for rel, tree in _sources() if rel.startswith("operator/")
            for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "PLURALS"}
    assert "operator/reconcile.py" in uses, uses  # RESOURCES is built from it


def sampler_copies() -> list[str]:
    """Module-level definitions of the sampler's functions, and draws (`multinomial`), outside model/sampling.py."""
    ours = {n.name for n in ast.parse((ROOT / SAMPLER_MODULE).read_text()).body
            if isinstance(n, ast.FunctionDef) and not _private(n.name)}
    bad = []
    for rel, tree in _sources():
        if rel == SAMPLER_MODULE:
            continue
        bad += [f"{rel}:{n.lineno} defines {n.name}" for n in tree.body
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name in ours]
        bad += [f"{rel}:{n.lineno} draws with multinomial" for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and n.attr == "multinomial"
                or isinstance(n, ast.Name) and n.id == "multinomial"]
    return bad


def test_one_sampler():
    assert sampler_copies() == []
    serving = ast.parse((ROOT / "serving" / "sampling.py").read_text())
    reexported = {a.name for n in serving.body if isinstance(n, ast.ImportFrom) and n.module == "flashops.model.sampling"
                  for a in n.names}
    assert {"sample", "token_probs"} <= reexported, reexported


def test_the_one_of_each_checks_catch_a_second_copy(tmp_path, monkeypatch):
    files = {
        "storage/_minio_compat.py": '"""1. `put`: ' + "why " * 20 + 'Remove when minio has it."""\n'
                                    "def put(c):\n    return c._put_object()\n",
        "storage/backends.py": "from flashops.storage import _minio_compat\nfrom minio.helpers import _sign\n\n"
                               "def f(client):\n    return client._upload_part(1)\n",
        "api/x.py": "from flashops.storage._minio_compat import put\nimport os\nH = os.environ['FLASHOPS_HOME']\n",
        "operator/y.py": "TABLE = {'TrainingRun': 'trainingruns'}\n",
        "model/sampling.py": "def sample(p, g):\n    return p.multinomial(1)\n",
        "serving/sampling.py": "import torch\n\ndef sample(p, g):\n    return torch.multinomial(p, 1)\n",
        "model/compat.py": '"""1. `gone`: short. Remove when never.\n3. `f`: ' + "why " * 20 + 'no removal note."""\n'
                           "def f():\n    pass\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ["api", "model", "operator", "serving", "storage"])
    bad = minio_private_uses({"_upload_part", "_put_object", "_sign"})
    assert any("backends.py:5 uses ._upload_part" in b for b in bad) and any("minio.helpers" in b for b in bad), bad
    assert not any("_minio_compat.py" in b for b in bad), bad
    assert minio_compat_importers() == ["api/x.py", "storage/backends.py"]
    assert workaround_problems(tmp_path / MINIO_COMPAT) == []
    problems = "\n".join(workaround_problems(tmp_path / "model/compat.py"))
    for expected in ("numbered ['1', '3']", "`gone` is not defined", "1: does not say why", "3: does not say when"):
        assert expected in problems, problems
    assert flashops_home_readers() == ["api/x.py:3 'FLASHOPS_HOME'"]
    assert plural_spellings() == ["operator/y.py:1 'trainingruns'"]
    assert sampler_copies() == ["serving/sampling.py:3 defines sample", "serving/sampling.py:4 draws with multinomial"]
