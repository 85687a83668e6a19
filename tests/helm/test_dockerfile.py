"""The Dockerfile, kept correct by reading (no container engine here): the build context it copies
is enough to build the flashops wheel, and the wheel has the entry points the chart and the
operator's manifests run.

    .venv/bin/pytest tests/helm/test_dockerfile.py -q
"""
from __future__ import annotations

import fnmatch
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def package_folders() -> list[str]:
    """The folders setup.py maps into the flashops package."""
    text = (REPO / "setup.py").read_text()
    line = next(l for l in text.splitlines() if l.startswith("FOLDERS"))
    return eval(line.split("=", 1)[1])  # a literal list of folder names


def copied_paths() -> list[str]:
    """Sources of the COPY instructions that take from the build context (not --from=...)."""
    out = []
    for line in DOCKERFILE.read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        parts = shlex.split(line)
        if not any(p.startswith("--from") for p in parts):
            out += [p.rstrip("/") for p in parts[1:-1] if not p.startswith("--")]
    return out


def ignored(path: str) -> bool:
    patterns = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)


def test_dockerfile_copies_every_package_folder_and_build_file():
    copied = copied_paths()
    needed = set(package_folders()) | {"pyproject.toml", "setup.py", "README.md", "constraints.txt"}
    assert needed - set(copied) == set(), "the image would miss these"
    for path in copied:
        assert (REPO / path).exists(), path
        assert not ignored(path), f"{path} is copied but .dockerignore drops it from the context"
    assert ignored(".venv") and ignored(".git") and ignored("tests")


def test_dockerfile_installs_with_the_constraints_and_the_right_torch():
    text = DOCKERFILE.read_text()
    installs = [l for l in text.splitlines() if "pip install" in l and "pip==" not in l]
    assert installs and all("-c constraints.txt" in l for l in installs), installs
    assert 'cpu)  index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"' in text
    torch_pin = next(l for l in (REPO / "constraints.txt").read_text().splitlines() if l.startswith("torch=="))
    assert f'"{torch_pin}"' in text, f"the Dockerfile pins another torch than constraints.txt ({torch_pin})"
    assert "USER 10001:10001" in text  # the uid the chart's podSecurityContext runs as


def test_the_wheel_builds_from_the_docker_context(tmp_path):
    """Copy exactly what the Dockerfile copies, build the wheel there (as `pip install .` does in the
    image), and check what the chart and the operator run is inside."""
    context = tmp_path / "context"
    context.mkdir()
    for path in copied_paths():
        src = REPO / path
        if src.is_dir():
            shutil.copytree(src, context / path, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, context / path)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), "."],
        cwd=context, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("flashops-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in package_folders():
        for py in (context / folder).rglob("*.py"):
            assert f"flashops/{py.relative_to(context).as_posix()}" in names, f"{folder}/{py.name} missing from the wheel"
    assert not any(n.startswith("flashops/operator/__init__") for n in names)  # stays a namespace portion
    entry_points = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "flashops = flashops.cli.main:main" in entry_points
