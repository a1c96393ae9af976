"""The package list in pyproject.toml covers every subpackage (a missing one breaks non-editable installs)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_declared():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(cfg["packages"])
    found = {"vlpet_fx." + ".".join(p.parent.relative_to(ROOT / "vlpet_fx").parts)
             for p in (ROOT / "vlpet_fx").rglob("__init__.py")}
    found = {f.rstrip(".") for f in found} | {"vlpet_fx.cli", "vlpet_fx.shipped_rules"}
    assert found <= declared, sorted(found - declared)
