"""Loading models and writing outputs that plain ``from_pretrained`` reads.

Outputs are built in a temporary sibling directory and renamed into place at the end, so an
interrupted run never leaves a half-written directory behind.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import transformers
from torch import nn

from vlmprune.adapters import get_adapter
from vlmprune.errors import VlmpruneError
from vlmprune.plan import PLAN_FILE, LayerKeep, PruningPlan
from vlmprune.prune.apply import WIDTHS_KEY, layer_shapes, prune_layer_width_, sync_config_

# Files save_pretrained writes itself, or that describe weights; everything else in a model
# directory (tokenizer, processor, chat template) is copied to the output.
_MODEL_FILES = ("config.json", "generation_config.json", PLAN_FILE)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


@contextlib.contextmanager
def atomic_output_dir(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``output`` only if the block succeeds."""
    output = Path(output).resolve()
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise VlmpruneError(f"output directory {output} exists and is not empty; choose another or pass --overwrite")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output.exists():
        trash = output.with_name(f".{output.name}.old-{tmp.name[-8:]}")
        output.rename(trash)
        tmp.rename(output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(output)


def load(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    **kwargs,
) -> nn.Module:
    """Load a vision-language model from a directory or hub id, pruned or not.

    Uniform-width checkpoints are ordinary ``AutoModelForImageTextToText`` checkpoints. When a
    vlmprune checkpoint has layers of different widths (recorded in the text config as
    ``vlmprune_layer_widths``), the model class is built with those widths before the weights load.
    """
    from vlmprune.convert import refuse_original

    refuse_original(path)  # Bunny / InternVLChatModel: before AutoConfig fails on their remote code
    config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    get_adapter(config)  # a clear error for unsupported families, before any weights load
    cls = transformers.AutoModelForImageTextToText._model_mapping[type(config)]
    if getattr(config.get_text_config(), WIDTHS_KEY, None):
        cls = _with_layer_widths(cls)
    model = cls.from_pretrained(
        str(path), config=config, dtype=dtype or "auto", trust_remote_code=trust_remote_code, **kwargs
    )
    return model.eval()


def _with_layer_widths(cls: type) -> type:
    """A subclass of ``cls`` whose constructor gives each layer the widths the config records."""

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        _shape_layers_(self)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})


def _shape_layers_(model: nn.Module) -> None:
    """Cut freshly built (not yet loaded) layers to the widths recorded in the config."""
    adapter = get_adapter(model)
    shapes = layer_shapes(model, adapter)
    layers = adapter.layers(model)
    for key, w in getattr(adapter.text_config(model), WIDTHS_KEY).items():
        idx = int(key)
        keep = LayerKeep(
            tuple(range(w["num_attention_heads"])),
            tuple(range(w["num_key_value_heads"])),
            tuple(range(w["intermediate_size"])),
        )
        prune_layer_width_(layers[idx], adapter, shapes[idx], keep)
    sync_config_(model, adapter)


def save_model(
    model: nn.Module,
    output: str | Path,
    plan: PruningPlan | None = None,
    source: str | Path | None = None,
    processor=None,
    overwrite: bool = False,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` (safetensors), its processor files and ``pruning_plan.json`` atomically.

    Processor/tokenizer files are copied from ``source`` when it is a local directory, else
    saved from ``processor`` (or loaded from ``source`` as a hub id) when one is available.
    ``extras(dir)`` may add files (plots, metrics) before the directory is put in place.
    """
    output = Path(output)
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        copy_processor_files(source, tmp, processor)
        if plan is not None:
            plan.save(tmp / PLAN_FILE)
        if extras is not None:
            extras(tmp)
    return output.resolve()


def copy_processor_files(source: str | Path | None, dest: Path, processor=None) -> None:
    """Put the processor/tokenizer of ``source`` beside a saved model."""
    if processor is not None:
        processor.save_pretrained(dest)
        return
    if source is None:
        return
    src = Path(source)
    if src.is_dir():
        for item in src.iterdir():
            if item.name in _MODEL_FILES or item.name.endswith(_WEIGHT_SUFFIXES) or item.name.startswith("."):
                continue
            target = dest / item.name
            if item.is_dir():
                if not (item / "config.json").exists() and not any(item.glob("*.safetensors")):
                    shutil.copytree(item, target, dirs_exist_ok=True)
            else:
                shutil.copy2(item, target)
        return
    try:  # a hub id: the processor comes from the hub cache
        transformers.AutoProcessor.from_pretrained(str(source)).save_pretrained(dest)
    except (OSError, ValueError):
        pass
