"""A copy of what ``pip install`` needs of this checkout, so that building it leaves the checkout untouched.

setuptools builds a local project in place (``build/``, ``*.egg-info``); the torch-free
install test and ``bench/install_size.py`` build from such a copy instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "app")
PROJECT_FILES = ("pyproject.toml", "README.md")


def copy_project(destination: Path, *, weights: bool = True) -> Path:
    """Copy the project into ``destination`` (created); ``weights=False`` leaves out the shipped bundles."""
    ignored = ["__pycache__"] + ([] if weights else ["weights"])
    destination.mkdir(parents=True)
    for name in PROJECT_FILES:
        shutil.copy(ROOT / name, destination / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, destination / package, ignore=shutil.ignore_patterns(*ignored))
    return destination
