"""The package list in pyproject.toml names every subpackage, so a normal (non-editable) install is complete."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "snip_lens").rglob("__init__.py")}
    found.add("snip_lens.kernels")  # installed from the top-level kernels/ folder
    assert found - listed == set(), f"subpackages missing from pyproject.toml packages: {sorted(found - listed)}"
    assert cfg["package-dir"]["snip_lens.kernels"] == "kernels"
