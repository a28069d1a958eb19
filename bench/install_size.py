"""Installed size of the service with torch against the torch-free edge install, measured with ``du``.

Builds two fresh virtual environments from a copy of this checkout, ``pip install '.[torch]'`` (what
``dmft serve`` on torch bundles needs) and ``pip install '.[edge]'`` (the ONNX runtime,
no torch), and prints ``du -sk`` of each and of its largest installed packages.

    python -m bench.install_size
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from tools.sources import copy_project

EXTRAS = ("torch", "edge")
LARGEST = 6


def kilobytes(path: Path) -> int:
    return int(subprocess.run(["du", "-sk", str(path)], check=True, capture_output=True, text=True).stdout.split()[0])


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="dmft-install-size-") as scratch:
        source = copy_project(Path(scratch) / "source")
        print("| install | environment MB | largest packages (MB) |")
        print("|---|---:|---|")
        for extra in EXTRAS:
            venv = Path(scratch) / extra
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--quiet"]
            subprocess.run([*pip, "install", f"{source}[{extra}]"], check=True)
            site_packages = next(venv.glob("lib/python*/site-packages"))
            packages = sorted(
                ((kilobytes(entry), entry.name) for entry in site_packages.iterdir() if entry.is_dir()), reverse=True
            )
            largest = ", ".join(f"{name} {size / 1024:.0f}" for size, name in packages[:LARGEST])
            print(f"| `pip install '.[{extra}]'` | {kilobytes(venv) / 1024:.0f} | {largest} |")


if __name__ == "__main__":
    main()
