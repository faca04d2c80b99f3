"""The package list in pyproject.toml covers every subpackage, and weights/ ships inside installs."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "unclip_cli").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found - listed == set(), f"add these to pyproject's packages: {sorted(found - listed)}"
    assert "unclip_cli.weights" in listed


def test_default_model_set_lookup(tmp_path, monkeypatch):
    from unclip_cli.modelset import folder as modelset

    root = tmp_path / "weights"
    (root / "a").mkdir(parents=True)
    (root / "a" / "model.json").write_text("{}")
    monkeypatch.setattr(modelset, "shipped_weights_dirs", lambda: [tmp_path / "absent", root])
    assert modelset.default_model_dir() == root / "a"
    (root / "b").mkdir()
    (root / "b" / "model.json").write_text("{}")
    assert modelset.default_model_dir() is None  # two sets, none named: no silent pick
    (root / "DEFAULT").write_text("b\n")
    assert modelset.default_model_dir() == root / "b"
