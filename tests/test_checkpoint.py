"""Outputs appear whole or not at all."""

from pathlib import Path

import pytest
import torch
from checks import logits
from tiny_models import build_tiny, make_inputs

from vlmprune.checkpoint import load, save_model
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


# The names a LLaVA checkpoint stores (transformers' legacy layout) -> the model's own names.
_LLAVA_KEYS = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))


def _model_key(key: str) -> str:
    for old, new in _LLAVA_KEYS:
        if key.startswith(old):
            return new + key[len(old):]
    return key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_then_loaded_model_is_bit_identical(tmp_path, dtype):
    """Saved, then loaded by vlmprune.load: the same weights and the same logits, bit for bit, as the
    model saved and as transformers' own load of the same checkpoint."""
    import transformers

    model = build_tiny("llava_llama_gqa").to(dtype)
    inputs = make_inputs("llava_llama_gqa", model)
    out = save_model(model, tmp_path / "out")
    loaded = load(out)
    assert next(loaded.parameters()).dtype == dtype
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    plain = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()  # memory-mapped, transformers' way
    assert torch.equal(logits(loaded, inputs), logits(plain, inputs))
    if dtype == torch.float32:  # (.to(bfloat16) also casts the rotary buffers, which a load rebuilds in float32)
        assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_load_reads_the_same_values_as_safetensors_and_maps_nothing(tmp_path):
    """vlmprune.load reads tensor by tensor (pread), not through a memory map: the same values as
    safetensors' own load of the file, and no mapping of the file is left behind."""
    from safetensors.torch import load_file

    out = save_model(build_tiny("llava_llama_gqa"), tmp_path / "out")
    loaded = load(out)
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: no region of the process maps the checkpoint
        assert str(out / "model.safetensors") not in maps.read_text()
    plain = load_file(out / "model.safetensors")
    state = loaded.state_dict()
    assert {_model_key(k) for k in plain} == set(state)
    assert all(torch.equal(state[_model_key(k)], v) for k, v in plain.items())
