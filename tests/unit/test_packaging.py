"""The package metadata builds without setuptools' deprecation boxes."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_the_license_is_an_spdx_expression_and_setuptools_reads_it():
    data = tomllib.loads(PYPROJECT.read_text())
    # A table ({ text = ... }) prints a deprecation box on every install since setuptools 77.
    assert data["project"]["license"] == "Apache-2.0"
    setuptools = next(
        Requirement(r) for r in data["build-system"]["requires"] if r.startswith("setuptools")
    )
    assert Version("77") in setuptools.specifier and Version("76.1") not in setuptools.specifier
