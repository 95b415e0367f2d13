"""Outputs appear whole or not at all."""

import pytest

from tiny_models import build_tiny
from vlmprune.io import save_model
from vlmprune.paths import MARKER, atomic_output_dir


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = build_tiny("llava_llama_mha")

    def half_write(self, path, **kwargs):
        (path / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", half_write)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_whole_directory(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "old.txt").write_text("old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "new.txt"])
