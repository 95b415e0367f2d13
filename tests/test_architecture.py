"""The package's shape: the layering contract, a lean CLI, the criterion registry, scores as an
artefact, and one config system (YAML < overrides < flags) for every command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

import vlmprune
from vlmprune.cli import build_parser, main
from vlmprune.config import PruneConfig, RecoverConfig, build, resolve
from vlmprune.importance.structures import WidthScores

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_contract_is_kept():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    run = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 kept, 0 broken" in run.stdout


def test_the_layers_contract_covers_every_module():
    """Every module of src/vlmprune stands on a floor of the contract: a layer entry covers a module when it
    is the module or a package above it. Only the containers of listed entries (the package face, and
    ``planning``, whose parts stand on two floors) hold no floor of their own."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    entries = {e.strip() for contract in config["contracts"] if contract["type"] == "layers"
               for layer in contract["layers"] for e in layer.replace("|", ":").split(":")}
    containers = {".".join(e.split(".")[:i]) for e in entries for i in range(1, e.count(".") + 1)}
    src = ROOT / "src"
    modules = {".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
               for p in (src / "vlmprune").rglob("*.py")}
    covered = lambda m: any(m == e or m.startswith(e + ".") for e in entries)  # noqa: E731
    missing = sorted(m for m in modules if not covered(m) and m not in containers)
    assert not missing, f"modules on no floor of the import-linter contract in pyproject.toml: {missing}"
    assert not entries - modules, f"contract entries that name no module: {sorted(entries - modules)}"


def test_cli_imports_neither_torch_nor_transformers():
    run = subprocess.run([sys.executable, "-X", "importtime", "-c", "import vlmprune.cli; import vlmprune"],
                         capture_output=True, text=True, check=True)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in run.stderr.splitlines() if "|" in line}
    assert "vlmprune" in imported and not imported & {"torch", "transformers", "accelerate", "peft"}


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("inspect", "prune", "recover", "evaluate", "study", "report", "data", "demo", "criteria"):
        assert command in out


def test_a_criterion_registered_from_user_code_prunes_through_the_public_api(tiny_repo, tmp_path):
    @vlmprune.register_criterion("last_channels_first", method="width")
    def last_channels_first(stats, ctx):
        """keeps the first MLP channels and kv groups of every layer"""
        return WidthScores([torch.arange(s.num_heads, 0, -1, dtype=torch.float64) for s in ctx.shapes],
                           [torch.arange(s.num_kv_heads, 0, -1, dtype=torch.float64) for s in ctx.shapes],
                           [torch.arange(s.intermediate_size, 0, -1, dtype=torch.float64) for s in ctx.shapes])

    assert "last_channels_first" in [c.name for c in vlmprune.criteria("width")]
    result = vlmprune.prune(model=str(tiny_repo.model), output=str(tmp_path / "out"), method="width", ratio=0.2,
                            criterion="last_channels_first", attention="none", mlp_multiple=8)
    plan = json.loads((tmp_path / "out" / "pruning_plan.json").read_text())
    record = json.loads((tmp_path / "out" / "run.json").read_text())["prune"]
    assert record["criterion"] == "last_channels_first"
    for keep in plan["layers"].values():  # the lowest scores (the last channels) went
        n = len(keep["mlp_channels"])
        assert keep["mlp_channels"] == list(range(n))
    assert result.removed == pytest.approx(record["achieved"]["ratio"])
    assert (tmp_path / "out" / "scores.json").exists()


def test_a_collector_and_criterion_registered_from_user_code_prune(tiny_repo, tmp_path, monkeypatch):
    import vlmprune.importance.registry as registry
    from vlmprune.calibrate import select_tokens

    monkeypatch.setattr(registry, "_COLLECTORS", dict(registry.collectors()))  # both end with the test
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    seen = []

    @vlmprune.register_collector("selected_tokens")
    def count_tokens(model, batches, tokens):
        seen.append(tokens)
        return sum(int(select_tokens(b, tokens, None).sum()) for b in batches)

    @vlmprune.register_criterion("second_layer_first", method="layer", stats="selected_tokens", default_tokens="text")
    def second_layer_first(stats, ctx):
        """layer 1 scores 0, the others the number of selected tokens"""
        scores = torch.full((len(ctx.shapes),), float(stats), dtype=torch.float64)
        scores[1] = 0
        return scores

    assert "selected_tokens" in registry.collectors()
    vlmprune.prune(model=str(tiny_repo.model), output=str(tmp_path / "out"), method="layer", ratio=0.2,
                   criterion="second_layer_first", calibration=str(tiny_repo.data),
                   image_folder=str(tiny_repo.images), num_samples=4)
    assert seen == ["text"]  # the criterion's default positions reached the collector
    plan = json.loads((tmp_path / "out" / "pruning_plan.json").read_text())
    record = json.loads((tmp_path / "out" / "run.json").read_text())["prune"]
    assert record["criterion"] == "second_layer_first" and plan["drop_layers"][0] == 1
    with pytest.raises(vlmprune.VlmpruneError, match="no statistics collector 'nope'.*selected_tokens"):
        registry.get_collector("nope")


def test_a_loss_registered_from_user_code_trains_through_the_public_api(tiny_repo, tmp_path, monkeypatch):
    import vlmprune.recover.losses as losses
    from vlmprune.data import IGNORE_INDEX

    monkeypatch.setattr(losses, "_REGISTRY", dict(losses._REGISTRY))  # the registration ends with the test
    calls = []

    @vlmprune.register_loss("mytest", positions=lambda x: x.targets != IGNORE_INDEX)
    def mytest(x):
        """L1 of the logits at the answer positions"""
        calls.append(tuple(x.student_logits.shape))
        return x.student_logits.abs().mean()

    assert [loss.name for loss in losses.losses()][:3] == ["sft", "logits", "hidden"]
    out = tmp_path / "out"
    cfg = build(RecoverConfig, student=str(tiny_repo.model), data=str(tiny_repo.data),
                image_folder=str(tiny_repo.images), output=str(out), loss="mytest=1", max_steps=2, learning_rate=1e-2,
                logging_steps=1)
    assert cfg.objective.loss == {"mytest": 1.0}
    vlmprune.recover.recover(cfg)
    assert len(calls) == 2 and all(len(shape) == 3 for shape in calls)  # one micro-batch per step
    before, after = vlmprune.load(tiny_repo.model).state_dict(), vlmprune.load(out).state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before if ".language_model." in f".{k}")
    log = json.loads((out / "trainer_log.json").read_text())
    assert any("loss_mytest" in entry for entry in log) and not any("loss_sft" in entry for entry in log)
    record = json.loads((out / "run.json").read_text())
    assert record["recovery"][-1]["losses"] == {"mytest": 1.0}
    with pytest.raises(vlmprune.VlmpruneError, match="unknown loss 'nope'; choose from sft, logits, hidden, mytest"):
        build(RecoverConfig, student="s", data="d", output="o", loss="nope=1")


@pytest.mark.parametrize("method, criterion", [("width", "taylor"), ("layer", "angular")])
def test_scores_replan_another_ratio_exactly_like_a_fresh_run(tiny_repo, tmp_path, method, criterion):
    common = ["--model", str(tiny_repo.model), "--method", method, "--criterion", criterion, "--calibration",
              str(tiny_repo.data), "--image-folder", str(tiny_repo.images), "--num-samples", "6", "--batch-size", "2"]
    first, second = ("0.1", "0.25") if method == "width" else ("0.2", "0.4")
    assert main(["prune", *common, "--ratio", first, "--output", str(tmp_path / "a")]) == 0
    assert main(["prune", *common, "--ratio", second, "--output", str(tmp_path / "fresh")]) == 0
    assert main(["prune", "--model", str(tiny_repo.model), "--scores", str(tmp_path / "a" / "scores.json"),
                 "--ratio", second, "--output", str(tmp_path / "replanned")]) == 0
    fresh = json.loads((tmp_path / "fresh" / "pruning_plan.json").read_text())
    replanned = json.loads((tmp_path / "replanned" / "pruning_plan.json").read_text())
    assert fresh["drop_layers"] == replanned["drop_layers"] and fresh["layers"] == replanned["layers"]
    fresh, replanned = (json.loads((tmp_path / d / "run.json").read_text())["prune"] for d in ("fresh", "replanned"))
    assert fresh["achieved"] == replanned["achieved"] and fresh["achieved"]["ratio"] > 0


def test_scores_of_another_model_are_refused(tiny_repo, tmp_path, capsys):
    assert main(["prune", "--model", str(tiny_repo.model), "--method", "width", "--criterion", "magnitude",
                 "--ratio", "0.1", "--output", str(tmp_path / "a")]) == 0
    assert main(["prune", "--model", str(tmp_path / "a"), "--scores", str(tmp_path / "a" / "scores.json"),
                 "--ratio", "0.1", "--output", str(tmp_path / "b")]) == 2
    assert "computed on another model" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_yaml_then_overrides_then_flags_for_every_stage(tmp_path):
    config = tmp_path / "prune.yaml"
    config.write_text(yaml.safe_dump({"model": "m", "output": "o", "method": "width", "ratio": 0.1,
                                      "num_samples": 16, "attention": "heads"}))
    parser = build_parser()
    args, rest = parser.parse_known_args(["prune", "--config", str(config), "ratio=0.3", "--set", "num_samples=8"])
    cfg = resolve(PruneConfig, args, rest)
    # overrides beat the YAML
    assert (cfg.planning.ratio, cfg.calibration.num_samples, cfg.width.attention) == (0.3, 8, "heads")
    args, rest = parser.parse_known_args(["prune", "--config", str(config), "ratio=0.3", "--ratio", "0.2"])
    assert resolve(PruneConfig, args, rest).planning.ratio == 0.2  # a flag beats both
    recover_yaml = tmp_path / "recover.yaml"
    recover_yaml.write_text("student: s\ndata: d\noutput: o\nloss: sft=1\nlearning_rate: 0.1\n")
    args, rest = parser.parse_known_args(["recover", "--config", str(recover_yaml), "learning_rate=0.5"])
    assert resolve(RecoverConfig, args, rest).training.learning_rate == 0.5
    for command in ("inspect", "evaluate", "data", "report", "quantize", "convert"):
        actions = {a.dest for a in parser._subparsers._group_actions[0].choices[command]._actions}
        assert {"config_file", "overrides"} <= actions, command


def test_an_adapter_hook_protects_layers_from_layer_pruning(monkeypatch):
    from tiny_models import build_tiny

    from vlmprune import adapters
    from vlmprune.errors import PlanError
    from vlmprune.prune.run import score_and_plan

    class KeepsLastLayer(adapters.Adapter):
        def protected_layers(self, model):
            return {len(self.layers(model)) - 1}

    monkeypatch.setitem(adapters.ADAPTERS, "llava", KeepsLastLayer)
    model = build_tiny("llava_llama_mha")
    plan, _ = score_and_plan(model, "layer", 0.2, "last")  # "drop the last n" must skip the protected last layer
    assert plan.drop_layers == [2]
    with pytest.raises(PlanError, match=r"drops layer\(s\) \[3\]"):
        vlmprune.apply_plan_(model, vlmprune.PruningPlan(drop_layers=[3]))


def test_slices_cover_every_prunable_row_and_column_once():
    """The adapter's one description of structures: each row of q/k/v (or fused qkv) and gate/up and each
    column of o/down belongs to exactly one structure of the right kind, for every layout."""
    from tiny_models import FAMILIES, build_tiny

    from vlmprune.adapters import get_adapter
    from vlmprune.summary import layer_shapes

    for family in FAMILIES:
        model = build_tiny(family)
        adapter = get_adapter(model)
        layer, shape = adapter.layers(model)[0], layer_shapes(model)[0]
        counts = {"q": shape.num_heads, "kv": shape.num_kv_heads, "mlp": shape.intermediate_size}
        by_module = {}
        for s in adapter.slices(layer, shape):
            size = s.module.weight.shape[s.dim]
            assert s.owner.shape == (size,), (family, s)
            assert set(s.owner[s.owner >= 0].tolist()) == set(range(counts[s.unit])), (family, s.unit)
            by_module.setdefault((id(s.module), s.dim), []).append(s)
        for slices in by_module.values():
            owned = torch.stack([s.owner >= 0 for s in slices]).sum(0)
            assert (owned == 1).all(), family  # every row/column: exactly one owner


def test_a_scheme_registered_from_user_code_quantizes_through_the_cli(tiny_repo, tmp_path, monkeypatch):
    import vlmprune.quantize as quantize
    from vlmprune.measure import is_quantized_weight

    monkeypatch.setattr(quantize, "SCHEMES", dict(quantize.SCHEMES))  # the registration ends with the test
    calls = []

    @vlmprune.register_scheme("int8-test", backend="torchao", description="int8 weights, registered by a test")
    def int8_test(model, selected, keep):
        from torchao.quantization import Int8WeightOnlyConfig

        calls.append(sorted(selected))
        return quantize.apply_torchao(model, selected, keep, Int8WeightOnlyConfig())

    assert list(quantize.SCHEMES)[:4] == ["int8", "int8-dynamic", "nf4", "int4"]
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_repo.model), "--scheme", "int8-test", "--output", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())["quantization"]
    assert (record["scheme"], record["backend"], record["description"]) == (
        "int8-test", "torchao", "int8 weights, registered by a test")
    assert len(calls) == 1 and record["quantized_modules"] == len(calls[0]) > 0
    loaded = dict(vlmprune.load(out).named_modules())
    assert all(is_quantized_weight(loaded[name].weight) for name in calls[0])
    assert main(["quantize", "--model", str(tiny_repo.model), "--scheme", "int3", "--output", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_benchmarks_and_scripts_import_only_what_exists():
    """Benchmarks and scripts import vlmprune names inside functions, so a refactor that moves a
    module breaks them only when someone runs them: resolve every such import statically."""
    import ast
    import importlib

    missing = []
    for path in sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("scripts/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vlmprune":
                try:
                    module = importlib.import_module(node.module)
                except ImportError as exc:
                    missing.append(f"{path.name}: {node.module} ({exc})")
                    continue
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{path.name}: {node.module}.{alias.name}")
    assert not missing, missing
