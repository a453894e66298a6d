"""The installed versions are the tested ones in constraints.txt, and every dependency is pinned there."""

import re
from importlib.metadata import PackageNotFoundError, version

from helpers import REPO



def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_every_declared_dependency_is_pinned():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"]) + project["optional-dependencies"]["test"] + \
        project["optional-dependencies"]["smollm2"] + project["optional-dependencies"]["qlora"] + \
        project["optional-dependencies"]["serve"]
    names = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower().replace("_", "-") for d in declared}
    assert sorted(names - set(_pins())) == []


def test_installed_versions_are_the_pinned_ones():
    wrong = []
    for name, want in _pins().items():
        try:
            have = version(name)
        except PackageNotFoundError:
            continue
        if have.split("+")[0] != want:
            wrong.append((name, have, want))
    assert wrong == []


def test_console_scripts_point_at_functions_that_exist():
    """Every [project.scripts] entry of pyproject.toml names a module and function that import (a moved entry point
    would install a command that fails on its first call)."""
    import importlib
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function, None)), (name, target)
