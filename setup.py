"""Maps each top-level folder into the one `flashops` package (flashops.api -> api/, ...).

Packages are found by walking the folders, so a new subpackage needs no edit here.
operator/ has no __init__.py on purpose: as a namespace portion it can never shadow the
standard library's `operator` module, even when the repo root is on sys.path.
"""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
FOLDERS = ["api", "model", "trainers", "serving", "operator", "storage", "cli"]

packages, package_dir = [], {}
for folder in FOLDERS:
    if not (ROOT / folder).is_dir():
        continue
    for d in sorted([ROOT / folder, *(p for p in (ROOT / folder).rglob("*") if p.is_dir())]):
        if "__pycache__" in d.parts or not any(d.glob("*.py")) and d != ROOT / folder:
            continue
        rel = d.relative_to(ROOT)
        name = "flashops." + ".".join(rel.parts)
        packages.append(name)
        package_dir[name] = str(rel)

setup(packages=packages, package_dir=package_dir)
