"""Installs are reproducible and free of known advisories: requirements.lock pins every dependency, the
Makefile and the images install from it, a failed install is never hidden, and the lower bounds sit above
the releases with known security fixes."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
UNLOCKED = {"torch"}  # its build (CPU or CUDA) is chosen by TORCH_SPEC or the GPU base image
# The first release with the fix of each advisory we know of; the lower bound must be at or above it.
ADVISORY_FLOORS = {
    "torch": "2.6.0",  # CVE-2025-32434: torch.load(weights_only=True) could still run code
    "aiohttp": "3.12.14",  # CVE-2024-52304, CVE-2025-53643: request smuggling
    "grpcio": "1.56.2",  # CVE-2023-33953: unbounded memory in header parsing
    "protobuf": "6.31.1",  # CVE-2024-7254, CVE-2025-4565: unbounded recursion in the Python parser
}


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        names += extra
    return [Requirement(text) for text in names]


def locked() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line.strip())
        if match:
            pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    return pins


def test_the_lock_pins_every_requirement_within_its_range():
    pins = locked()
    text = LOCK.read_text()
    assert "make lock" in text and "--index-url" not in text and "--find-links" not in text and "file://" not in text
    for requirement in pyproject_requirements():
        name = canonicalize_name(requirement.name)
        if name in UNLOCKED:
            assert name not in pins
            continue
        assert name in pins, f"{requirement.name} is not in {LOCK.name}: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])


def test_what_is_installed_is_what_the_lock_says():
    mismatched = []
    for name, version in locked().items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue  # an extra this venv does not install (bench, gpu)
        if installed != version:
            mismatched.append(f"{name} {installed} (lock: {version})")
    assert not mismatched, f"installed outside {LOCK.name}: {mismatched}"


@pytest.mark.parametrize("package", sorted(ADVISORY_FLOORS))
def test_lower_bounds_are_above_known_advisories(package):
    (requirement,) = [r for r in pyproject_requirements() if canonicalize_name(r.name) == package]
    floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
    assert floors and min(floors) >= Version(ADVISORY_FLOORS[package]), requirement


def install_lines(text: str) -> list[str]:
    """Shell lines that run `pip install` (backslash continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if re.search(r"pip(\)|\s)+.*install", line)
            and not line.strip().startswith("#")]


def test_the_makefile_installs_from_the_lock_and_never_hides_a_failure():
    lines = install_lines((ROOT / "Makefile").read_text())
    assert lines
    for line in lines:
        assert "|| true" not in line and "| grep" not in line, line
        project_install = re.search(r'install .*-e "\.\[', line)
        if project_install and "constraints-min" not in line:
            assert "-c $(LOCK)" in line, line
    assert "pip check" in (ROOT / "Makefile").read_text()


def test_the_images_install_from_the_lock():
    for dockerfile in sorted((ROOT / "deploy" / "docker").glob("*.Dockerfile")):
        text = dockerfile.read_text()
        assert re.search(r"^COPY .*requirements\.lock", text, re.M), dockerfile.name
        for line in install_lines(text):
            assert "-c requirements.lock" in line and "|| true" not in line, (dockerfile.name, line)
