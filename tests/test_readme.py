"""The README, held to what it says.

Its walk-through (the ``bash`` and ``python`` blocks whose info string says ``walkthrough``)
runs in order, as printed, against a real ``dmft serve``, in an environment that holds what the
README's first command installs and nothing more: the project without extras, freshly installed
(``install_fixtures``). Two things stand in for the reader's machine: the server listens on a
free port instead of 8000 (the blocks' ``localhost:8000`` is pointed there, and ``DMFT_URL``
for ``dmft replay``), and ``curl`` reads a ``.curlrc`` that turns an HTTP error into a failed
command, so that no answer of the service goes unchecked. The blocks run in a folder of their
own, which holds the repository's ``examples/``.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tools.stack import Server, run_service

from .install_fixtures import DOCKERFILE, ROOT, Dockerfile, Installed

README = ROOT / "README.md"
PYPROJECT = ROOT / "pyproject.toml"
FENCE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<code>.*?)^```$", re.M | re.S)
DEFAULT_ADDRESSES = ("localhost:8000", "127.0.0.1:8000")
BLOCK_TIMEOUT_S = 120
CURLRC = """\
fail-with-body
show-error
max-time = 60
"""


@dataclass(frozen=True)
class Block:
    language: str
    tags: tuple[str, ...]  # the info string's words after the language
    code: str
    line: int  # of the opening fence in README.md

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.language})"

    def commands(self) -> str:
        """The code without its comments, which show output and may elide it."""
        lines = (line.split(" # ")[0] for line in self.code.splitlines() if not line.lstrip().startswith("#"))
        return "\n".join(lines)


def blocks(text: str) -> list[Block]:
    found = []
    for match in FENCE.finditer(text):
        language, *tags = match["info"].split() or [""]
        found.append(Block(language, tuple(tags), match["code"], text.count("\n", 0, match.start()) + 1))
    return found


def walkthrough(text: str) -> list[Block]:
    return [block for block in blocks(text) if "walkthrough" in block.tags]


@pytest.fixture(scope="module")
def server(installed: Installed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``dmft serve`` of the fresh install, as the README's first command runs it (no Redis)."""
    with run_service(tmp_path_factory.mktemp("serve"), dmft=installed.bin / "dmft", env=installed.env) as running:
        yield running


def test_the_walkthrough_needs_only_what_the_first_command_installs() -> None:
    text = README.read_text()
    first = blocks(text)[0]
    # The walk-through runs in an install with the image's extras: the first command installs the same.
    extras = ",".join(sorted(Dockerfile.read().extras))
    assert first.language == "bash" and f"pip install -e '.[{extras}]' " in first.code
    assert "dmft serve --port 8000" in first.code
    found = walkthrough(text)
    assert len(found) >= 5, [str(block) for block in found]
    assert {block.language for block in found} <= {"bash", "python"}
    for block in found:
        assert "..." not in block.commands(), f"{block}: the test runs it, so nothing may be elided"


def test_the_walkthrough_runs_as_printed(server: Server, installed: Installed, tmp_path: Path) -> None:
    folder = tmp_path / "reader"
    folder.mkdir()
    (folder / "examples").symlink_to(ROOT / "examples")
    curl_home = tmp_path / "curl"
    curl_home.mkdir()
    (curl_home / ".curlrc").write_text(CURLRC)
    env = {
        **{name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "VIRTUAL_ENV")},
        **installed.env,
        "PATH": f"{installed.bin}{os.pathsep}{os.environ['PATH']}",  # as after `. .venv/bin/activate`
        "VIRTUAL_ENV": str(installed.venv),
        "CURL_HOME": str(curl_home),
        "DMFT_URL": server.base,  # where `dmft replay` goes without --url
    }
    address = f"127.0.0.1:{server.port}"
    for block in walkthrough(README.read_text()):
        code = block.code
        for default in DEFAULT_ADDRESSES:
            code = code.replace(default, address)
        if block.language == "bash":
            command, stdin = ["bash", "-euo", "pipefail", "-c", code], None
        else:
            command, stdin = ["python", "-"], code
        result = subprocess.run(
            command,
            input=stdin,
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
            check=False,
        )
        assert result.returncode == 0, f"{block} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr, f"{block}:\n{result.stderr}"
    assert sorted(path.name for path in folder.iterdir()) == ["examples"], "the walk-through leaves files behind"
    log = server.log.read_text()
    assert "Traceback" not in log, log


def test_every_command_that_installs_torch_takes_the_pinned_cpu_build() -> None:
    (pin,) = re.findall(r'"torch==([^"]+)"', PYPROJECT.read_text())
    command = f"pip install --index-url https://download.pytorch.org/whl/cpu torch=={pin}"
    assert command in DOCKERFILE.read_text()
    assert command in README.read_text()
