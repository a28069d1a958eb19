"""The service installed as a user installs it, checked without Docker or the network.

``Dockerfile`` reads the instructions that matter to a run (``COPY`` of the build stage, ``ENV``,
``USER``, ``WORKDIR``, ``EXPOSE``, ``HEALTHCHECK``, ``CMD``) from the file itself.
``fresh_install`` installs the project into a new virtual environment the way the image's
``pip install .`` does: a wheel of the files its build stage copies, not editable. Its
dependencies are not downloaded again: the environment sees, through a ``.pth`` file, a folder
of links to exactly the distributions that installing the project with the image's extras would
bring (their closure, read from the metadata of this environment), so a module that only a
development or training extra provides is missing there, as on a user's machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
# What a Debian-based image's processes find on PATH before its ENV adds to it.
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
# `pip install .`, `pip install ".[torch]"` ...: the project from the build context, with its extras.
_PROJECT_INSTALL = re.compile(r"""pip install (?:\S+ )*["']?\.(?:\[(?P<extras>[\w,-]+)\])?["']?(?:\s|$)""")


@dataclass
class Stage:
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arguments for word, arguments in self.instructions if word == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage {self.name or 'final'}"
        return found[-1]


@dataclass
class Dockerfile:
    stages: list[Stage]

    @classmethod
    def read(cls, path: Path = DOCKERFILE) -> Dockerfile:
        stages: list[Stage] = []
        logical = ""
        for line in path.read_text().splitlines():
            if not logical and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            keyword, _, arguments = (logical + line).strip().partition(" ")
            logical = ""
            keyword = keyword.upper()
            if keyword == "FROM":
                words = arguments.split()
                stages.append(Stage(words[2] if len(words) == 3 and words[1].upper() == "AS" else None))
            else:
                stages[-1].instructions.append((keyword, arguments.strip()))
        return cls(stages)

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def _project_install(self) -> tuple[Stage, set[str]]:
        """The stage that installs the project (``pip install .`` or ``".[extra,...]"``) and its extras."""
        for stage in self.stages:
            for run in stage.all("RUN"):
                match = _PROJECT_INSTALL.search(run)
                if match:
                    return stage, set(filter(None, (match["extras"] or "").split(",")))
        raise AssertionError("no stage runs 'pip install .'")

    @property
    def build(self) -> Stage:
        """The stage that installs the project."""
        return self._project_install()[0]

    @property
    def extras(self) -> set[str]:
        """The extras the image installs the project with."""
        return self._project_install()[1]

    def copied(self) -> list[str]:
        """What the build stage copies from the build context."""
        sources: list[str] = []
        for arguments in self.build.all("COPY"):
            words = [word for word in shlex.split(arguments) if not word.startswith("--")]
            sources += words[:-1]
        return sources

    def env(self, inherited: dict[str, str]) -> dict[str, str]:
        """The final stage's ``ENV``, each value expanded as Docker does, over ``inherited``."""
        env = dict(inherited)
        for arguments in self.final.all("ENV"):
            for pair in shlex.split(arguments):
                name, _, value = pair.partition("=")
                env[name] = _VARIABLE.sub(lambda match: env.get(match.group(1) or match.group(2), ""), value)
        return env

    @property
    def user(self) -> int:
        return int(self.final.last("USER"))

    @property
    def workdir(self) -> str:
        return self.final.last("WORKDIR")

    @property
    def exposed_port(self) -> int:
        return int(self.final.last("EXPOSE").split("/")[0])

    @property
    def command(self) -> list[str]:
        """``CMD`` in its exec form."""
        return json.loads(self.final.last("CMD"))

    @property
    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """``HEALTHCHECK``'s options (``interval`` ...) and its command in the exec form."""
        options_text, _, command = self.final.last("HEALTHCHECK").partition("CMD ")
        options = dict(option.removeprefix("--").split("=", 1) for option in options_text.split())
        return options, json.loads(command)


def dependency_closure(requirements: list[str]) -> list[metadata.Distribution]:
    """The distributions of this environment that installing ``requirements`` brings, theirs included."""
    found: dict[str, metadata.Distribution] = {}
    pending = [Requirement(text) for text in requirements]
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        distribution = metadata.distribution(name)  # a missing one fails: the install would need it
        extras = set(requirement.extras)
        key = f"{name}[{','.join(sorted(extras))}]"
        if key in found:
            continue
        found[key] = distribution
        for text in distribution.requires or []:
            nested = Requirement(text)
            wanted = nested.marker is None or any(nested.marker.evaluate({"extra": extra}) for extra in extras | {""})
            if wanted:
                nested.marker = None
                pending.append(nested)
    unique = {canonicalize_name(d.metadata["Name"]): d for d in found.values()}
    return list(unique.values())


def _without_marker(requirement: Requirement) -> str:
    requirement.marker = None
    return str(requirement)


def link_distributions(distributions: list[metadata.Distribution], folder: Path) -> None:
    """Link the top-level modules, packages and metadata of each distribution into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for distribution in distributions:
        files = distribution.files
        assert files is not None, f"{distribution.metadata['Name']} lists no files (no RECORD)"
        tops = {Path(str(file)).parts[0] for file in files if not str(file).startswith("..")}
        for top in tops - {"__pycache__"}:
            source = Path(str(distribution.locate_file(top)))
            link = folder / top
            if source.exists() and not link.exists():
                link.symlink_to(source)


@dataclass(frozen=True)
class Installed:
    """A fresh environment holding the project and its run-time dependencies alone; its interpreter
    runs with ``env`` added to the environment."""

    venv: Path
    env: dict[str, str]

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


def readable_folder(prefix: str) -> Path:
    """A new folder that every user may read (an unprivileged server reads the environment in it)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    return folder


def shared_interpreter(folder: Path) -> tuple[Path, dict[str, str]]:
    """This Python, where every user may run it, and the environment it needs to run there.

    An interpreter under a private home (pyenv's under ``/root``) cannot be run by another
    user; hard links to its files in ``folder`` can, without copying them. The copy finds its
    own ``libpython`` through ``LD_LIBRARY_PATH``, since the original names its library folder
    by an absolute path. Where the links cannot be made (another file system), this interpreter
    itself.
    """
    base = Path(sys.base_prefix)
    executable = Path("bin") / f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = Path("lib") / executable.name
    copy = folder / "python"
    files = [executable, *(path.relative_to(base) for path in base.glob("lib/libpython*"))]
    for directory, subdirectories, names in os.walk(base / stdlib):
        subdirectories[:] = [name for name in subdirectories if name not in ("site-packages", "__pycache__")]
        files += [(Path(directory) / name).relative_to(base) for name in names]
    try:
        for relative in files:
            target = copy / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            source = base / relative
            if source.is_symlink():
                target.symlink_to(source.readlink())
            else:
                os.link(source, target)
    except OSError:
        return base / executable, {}
    for directory in [copy, *copy.rglob("*")]:
        if directory.is_dir():
            directory.chmod(0o755)
    return copy / executable, {"LD_LIBRARY_PATH": str(copy / "lib")}


@contextmanager
def fresh_install(dockerfile: Dockerfile) -> Iterator[Installed]:
    """The project installed into a fresh environment, with the extras the image installs, as its
    build stage installs it: a wheel built from what that stage copies, not editable."""
    root = readable_folder("dmft-install-")
    try:
        context = root / "context"
        context.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
        for source in dockerfile.copied():
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(path, context / source, ignore=ignore)
            else:
                shutil.copy(path, context / source)
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(context)])
        (wheel,) = (root / "dist").glob("*.whl")
        venv = root / "venv"
        interpreter, interpreter_env = shared_interpreter(root)
        _run([str(interpreter), "-m", "venv", "--without-pip", str(venv)], interpreter_env)
        install = ["install", "--no-deps", "--no-index", str(wheel)]
        _run([*pip, "--python", str(venv / "bin" / "python"), *install], interpreter_env)
        (site_packages,) = (venv / "lib").glob("python*/site-packages")
        (installed,) = metadata.distributions(name="dmft-activity", path=[str(site_packages)])
        requirements = [
            _without_marker(requirement)
            for requirement in map(Requirement, installed.requires or [])
            if requirement.marker is None
            or any(requirement.marker.evaluate({"extra": extra}) for extra in dockerfile.extras)
        ]
        dependencies = root / "dependencies"
        link_distributions(dependency_closure(requirements), dependencies)
        (site_packages / "dependencies.pth").write_text(f"{dependencies}\n")
        yield Installed(venv=venv, env=interpreter_env)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def installed() -> Iterator[Installed]:
    """The project as the image installs it, in a fresh environment; one for the whole test run."""
    with fresh_install(Dockerfile.read()) as done:
        yield done


def as_user(uid: int, installed: Installed) -> list[str]:
    """The prefix that runs a command as ``uid`` (with the same group id), where the installed service
    can run so; else no prefix: the command runs as this process's user."""
    if os.geteuid() != 0 or uid == 0 or shutil.which("setpriv") is None:
        return []
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    probe = subprocess.run(
        [*prefix, str(installed.bin / "python"), "-c", "import app.main"],
        capture_output=True,
        timeout=120,
        env={**_clean_environment(), **installed.env},
        cwd="/",
    )
    return prefix if probe.returncode == 0 else []


def _clean_environment() -> dict[str, str]:
    """This environment without its Python paths, which would make the project look installed already."""
    return {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTHONHOME")}


def _run(command: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**_clean_environment(), **(env or {})},
        cwd=tempfile.gettempdir(),
    )
    assert result.returncode == 0, f"{shlex.join(command)} failed:\n{result.stdout}{result.stderr}"
