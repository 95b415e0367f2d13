"""`vlmprune prune --device-map`: a model dispatched across the CPU and disk offload prunes exactly like one on a
single device."""

from __future__ import annotations

import json

import pytest
import torch
from recover_helpers import write_data, write_pair
from safetensors.torch import load_file

import vlmprune
from vlmprune.config import PruneConfig, build
from vlmprune.errors import VlmpruneError

# Layers 2 and 3 of the language model live on disk (their parameters are meta between forwards);
# the rest on the CPU.
SPLIT = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.language_model.embed_tokens": "cpu",
         "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "cpu",
         "model.language_model.layers.2": "disk", "model.language_model.layers.3": "disk",
         "model.language_model.norm": "cpu", "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dispatch")
    teacher, _ = write_pair(root)
    data, images = write_data(root / "data", 8)
    return {"model": teacher, "data": data, "images": images}


def test_the_split_really_offloads_to_disk(dirs, tmp_path):
    model = vlmprune.load(dirs["model"], device_map=SPLIT, offload_folder=str(tmp_path / "off"))
    assert model.model.language_model.layers[2].mlp.down_proj.weight.device.type == "meta"
    assert model.model.language_model.layers[0].mlp.down_proj.weight.device.type == "cpu"


@pytest.mark.parametrize("method, criterion", [("width", "taylor"), ("width", "activation"), ("width", "magnitude"),
                                               ("layer", "block_influence")])
def test_device_map_prune_equals_single_device_prune(dirs, tmp_path, method, criterion):
    common = dict(model=str(dirs["model"]), method=method, criterion=criterion,
                  ratio=0.1 if method == "width" else 0.15,
                  calibration=str(dirs["data"]), image_folder=str(dirs["images"]), num_samples=8, batch_size=2)
    single = vlmprune.prune(output=str(tmp_path / "single"), **common)
    split = vlmprune.prune(output=str(tmp_path / "split"), device_map=json.dumps(SPLIT), **common)
    a, b = json.loads((single.output / "pruning_plan.json").read_text()), json.loads(
        (split.output / "pruning_plan.json").read_text())
    assert a["drop_layers"] == b["drop_layers"] and a["layers"] == b["layers"]
    sa, sb = (json.loads((r.output / "scores.json").read_text())["scores"] for r in (single, split))
    for key in ("heads", "kv_groups", "mlp_channels", "layers"):
        if key in sa:
            assert torch.allclose(torch.tensor(sa[key], dtype=torch.float64),
                                  torch.tensor(sb[key], dtype=torch.float64), rtol=1e-5, atol=1e-8), key
    wa, wb = load_file(str(single.output / "model.safetensors")), load_file(str(split.output / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not list(tmp_path.glob(".split.offload-*"))  # the temporary offload folder is gone


def test_device_map_with_a_plan_and_auto(dirs, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "drop_layers": [1]}))
    out = vlmprune.prune(model=str(dirs["model"]), plan=str(plan), output=str(tmp_path / "o"), device_map="auto",
                         max_memory="cpu=1GiB")
    model = vlmprune.load(out.output)
    assert model.config.text_config.num_hidden_layers == 3


@pytest.mark.parametrize("options, match", [
    (dict(device="cpu", device_map="auto"), "either --device"),
    (dict(max_memory="cpu=1GiB"), "add --device-map"),
    (dict(device_map="auto", max_memory="cpu"), "DEVICE=SIZE"),
    (dict(device_map="everywhere"), "--device-map must be one of"),
])
def test_bad_dispatch_options_are_refused(options, match):
    with pytest.raises(VlmpruneError, match=match):
        build(PruneConfig, model="m", output="o", method="layer", ratio=0.2, **options)
