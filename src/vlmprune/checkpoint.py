"""Loading models and writing outputs that plain ``from_pretrained`` reads.

Outputs are built in a temporary sibling directory and renamed into place at the end, so an
interrupted run never leaves a half-written directory behind.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import transformers
from torch import nn

from vlmprune import quiet
from vlmprune.adapters import get_adapter, supported_model_types
from vlmprune.convert.detect import converted_without_processor, refuse_original
from vlmprune.errors import VlmpruneError
from vlmprune.paths import atomic_output_dir, check_model_source
from vlmprune.planning.plan import PLAN_FILE, LayerKeep, PruningPlan
from vlmprune.record import RUN_FILE
from vlmprune.summary import layer_shapes
from vlmprune.surgery.apply import WIDTHS_KEY, prune_layer_width_, sync_config_

# Files save_pretrained writes itself, or that describe weights; everything else in a model
# directory (tokenizer, processor, chat template) is copied to the output.
_MODEL_FILES = ("config.json", "generation_config.json", PLAN_FILE, RUN_FILE)  # a stage writes its own
# Processor files that live in a sub-folder of a model directory (transformers >= 4.5x saves extra
# chat templates there); every other sub-folder of a model directory is the user's and is not copied.
_PROCESSOR_SUBDIRS = ("additional_chat_templates",)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def load_config(path: str | Path, trust_remote_code: bool = False):
    """The model's config, with clear errors for a bad path, bad JSON or an unknown model_type."""
    refuse_original(path)  # Bunny / InternVLChatModel: say how to convert, before AutoConfig fails on their code
    source = check_model_source(path)
    try:
        return transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        if Path(source).is_dir():
            raise VlmpruneError(f"cannot read the config of {path}: {exc}".split("\n")[0]
                                + "; supported model types: " + ", ".join(supported_model_types())) from None
        raise VlmpruneError(f"cannot load {path}: it is not a local directory and the hub did not provide it "
                            f"({type(exc).__name__}); check the path, or the hub id and your connection") from None


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
    Only safetensors weights are read, tensor by tensor into the process's own memory (not
    memory-mapped: see :func:`_read_not_mapped`). ``dtype`` is a torch dtype or its name as the
    commands take it (``float16``, ...); None or ``"auto"`` keeps the checkpoint's.
    """
    config = load_config(path, trust_remote_code)
    get_adapter(config)  # a clear error for unsupported families, before any weights load
    cls = transformers.AutoModelForImageTextToText._model_mapping[type(config)]
    if getattr(config.get_text_config(), WIDTHS_KEY, None):
        cls = _with_layer_widths(cls)
    try:
        with _read_not_mapped():
            model = cls.from_pretrained(str(path), config=config, dtype=dtype or "auto", use_safetensors=True,
                                        trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        raise VlmpruneError(f"cannot load the weights of {path}: {str(exc).splitlines()[0]}") from None
    return model.eval()


@contextlib.contextmanager
def _read_not_mapped() -> Iterator[None]:
    """Make transformers read safetensors files with pread(2) instead of mapping them.

    transformers maps each checkpoint file and makes the parameters views of the mapping. Every page
    the process touches then counts in its RSS for as long as any parameter still views the file,
    so weights the cut replaces (or the scoring copies) stay resident on top of their successors:
    `vlmprune prune` peaked higher by about the cut-away share of the weights
    (docs/performance/prune-cost.md). Read into memory of its own, a replaced weight is freed.
    The values are the same bytes either way (tests/test_checkpoint.py). Where this transformers does not
    open files through ``modeling_utils.safe_open`` the load goes on as transformers does it.
    """
    import transformers.modeling_utils as modeling_utils

    original = getattr(modeling_utils, "safe_open", None)
    if original is None:
        yield
        return

    def safe_open(*args, backend: str = "mmap", **kwargs):
        return original(*args, backend="pread" if backend == "mmap" else backend, **kwargs)

    modeling_utils.safe_open = safe_open
    try:
        yield
    finally:
        modeling_utils.safe_open = original


def load_processor(model: str | Path, trust_remote_code: bool = False):
    """The model's processor (tokenizer, image processor, chat template), with a clear error when absent."""
    source = check_model_source(model)
    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in PROCESSOR_FILES):
        fix = converted_without_processor(folder) or (
            f"copy them from the model it was made from, or save that model's processor into it "
            f"(AutoProcessor.from_pretrained(ORIGINAL).save_pretrained('{folder}'))")
        raise VlmpruneError(f"{model} has no processor (none of {', '.join(PROCESSOR_FILES)}), and this command needs "
                            f"one to turn text and images into inputs: {fix}")
    try:
        return transformers.AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise VlmpruneError(
            f"cannot load the processor of {model} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            f"the model directory needs its processor/tokenizer files and chat template"
        ) from None


# the files of a saved processor (one is enough to try loading it)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json")


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


def check_finite(model: nn.Module) -> None:
    """Refuse to save a model with NaN or infinite weights (a diverged run must not look like a result)."""
    # plain tensors only: quantized tensor subclasses (torchao, bitsandbytes) hold integer codes
    bad = [name for name, t in model.state_dict().items()
           if type(t) is torch.Tensor and t.is_floating_point() and not _all_finite(t)]
    if bad:
        raise VlmpruneError(f"refusing to save: {len(bad)} weight tensor(s) hold NaN or inf values "
                            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); the run diverged: lower the "
                            f"learning rate or check the loss weights, and start again")


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite, from its min and max (NaN and inf propagate through
    both): no temporary as large as the tensor, which ``torch.isfinite(t).all()`` makes (|t| and a
    mask: 1.25x the tensor, and a few seconds on the embedding of a small model)."""
    if t.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(t.detach())
    except (RuntimeError, NotImplementedError):  # a dtype without aminmax (float8): the plain way
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(low) and torch.isfinite(high))


def save_model(
    model: nn.Module,
    output: str | Path,
    plan: PruningPlan | None = None,
    source: str | Path | None = None,
    processor=None,
    overwrite: bool = False,
    extras: Callable[[Path], None] | None = None,
    inputs: Iterable[tuple[str, str | Path | None]] = (),
) -> Path:
    """Write ``model`` (safetensors), its processor files and ``pruning_plan.json`` atomically (``extras``
    adds the rest: ``run.json``, scores, plots).

    Processor/tokenizer files are copied from ``source`` when it is a local directory, else
    saved from ``processor`` (or loaded from ``source`` as a hub id) when one is available.
    ``extras(dir)`` may add files (plots, metrics) before the directory is put in place. Weights
    that are not finite are refused; ``inputs`` are checked as :func:`check_output` says.
    """
    check_finite(model)
    output = Path(output)
    with atomic_output_dir(output, overwrite=overwrite, inputs=[("input model", source), *inputs]) as tmp:
        with quiet.deepspeed_only_if_in_use():
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
            if item.is_file():
                shutil.copy2(item, dest / item.name)
            elif item.is_dir() and item.name in _PROCESSOR_SUBDIRS:
                shutil.copytree(item, dest / item.name, dirs_exist_ok=True)
        return
    try:  # a hub id: the processor comes from the hub cache
        transformers.AutoProcessor.from_pretrained(str(source)).save_pretrained(dest)
    except (OSError, ValueError):
        pass
