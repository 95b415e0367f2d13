"""What both converters share: reading an original checkpoint without its code, and writing the native one.

The original checkpoints are remote-code repositories (``BunnyPhiForCausalLM``,
``InternVLChatModel``) whose Python files do not even import on transformers 5.x. Everything here
reads them as data only: ``config.json`` with ``json``, weights with ``safetensors``, tokenizer
files with the native tokenizer classes. Nothing from the source directory is ever executed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vlmprune.errors import VlmpruneError
from vlmprune.paths import check_safetensors
from vlmprune.readers import read_json


class ConversionError(VlmpruneError):
    """The source checkpoint cannot be expressed exactly by the native classes (or is unreadable)."""


def read_config(src: Path) -> dict:
    path = Path(src) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src} has no config.json: give the directory of the original checkpoint "
                              f"(e.g. after `hf download <hub id> --local-dir {src}`)")
    config = read_json(path, f"{path}", ConversionError)
    if not isinstance(config, dict):
        raise ConversionError(f"{path} must hold a JSON object of model options, not a {type(config).__name__}; "
                              f"fetch the checkpoint's config.json again")
    check_numbers(config, str(path))
    return config


# config fields that hold numbers (sizes, counts, ids, epsilons); a string there is a broken config
_NUMERIC = re.compile(r"(^num_|_size$|_dim$|_layers$|_heads$|_id$|_index$|_eps$|_epsilon$|_theta$|"
                      r"^max_position_embeddings$)")


def check_numbers(config: dict, where: str, prefix: str = "") -> None:
    """Refuse a number written as a string (``"vocab_size": "100"``) anywhere in a config, nested ones too."""
    for key, value in config.items():
        if isinstance(value, dict):
            check_numbers(value, where, f"{prefix}{key}.")
        elif isinstance(value, str) and _NUMERIC.search(str(key)):
            raise ConversionError(f"{where}: {prefix}{key} = {value!r} is text where a number belongs; write it "
                                  f"without quotes, or fetch the checkpoint's config.json again")


def safetensors_files(src: Path) -> list[Path]:
    """The weight files of a checkpoint directory: the index's shards, else every model*.safetensors."""
    src = Path(src)
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(read_json(index, str(index), ConversionError)["weight_map"].values())
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConversionError(f"{index} is not a safetensors index ({exc!r}); fetch it again") from None
        return [src / name for name in sorted(names)]
    return sorted(p for p in src.glob("*.safetensors") if p.name.startswith("model"))


def load_state_dict(src: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors (under ``prefix``) of a (possibly sharded) safetensors checkpoint, by their original names."""
    from safetensors import safe_open

    src = Path(src)
    files = safetensors_files(src)
    if not files:
        pickled = [p.name for p in src.glob("*.bin")]
        hint = (f" It has {', '.join(pickled)}: vlmprune never reads pickled weights; convert them to safetensors "
                f"first (or download the repository's safetensors revision).") if pickled else ""
        raise ConversionError(f"{src} has no model*.safetensors weights.{hint}")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.is_file():
            raise ConversionError(f"shard {path.name} listed in model.safetensors.index.json is missing from {src}")
        check_safetensors(path)  # cut short: an interrupted download
        try:
            with safe_open(path, framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type: a corrupt file, said as such
            raise ConversionError(f"cannot read the weights {path} ({type(exc).__name__}: {exc}); fetch the "
                                  f"checkpoint again") from None
    return state


def require(config: dict, field: str, expected, where: str = "config.json") -> None:
    """Refuse a config value the native classes cannot reproduce exactly."""
    value = config.get(field)
    allowed = expected if isinstance(expected, (tuple, list, set)) else (expected,)
    if value not in allowed:
        raise ConversionError(
            f"{where}: {field} = {value!r} cannot be converted exactly; vlmprune convert supports "
            f"{' or '.join(repr(a) for a in allowed)}")


class KeyMapper:
    """Pops source tensors under their original names; leftovers mean an unexpected checkpoint layout.

    Every source tensor must be consumed (or explicitly ignored) so that a checkpoint with a part
    the converter does not know about is refused instead of silently losing weights.
    """

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = dict(state)
        self.out: dict[str, torch.Tensor] = {}

    def has(self, key: str) -> bool:
        return key in self.state

    def pop(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise ConversionError(f"the checkpoint has no tensor {key!r}, which this model family must have")
        return self.state.pop(key)

    def move(self, src_prefix: str, dst_prefix: str, transform: Callable[[str, torch.Tensor], dict] | None = None):
        """Rename every tensor under ``src_prefix``; ``transform(rest, tensor)`` may split one into several."""
        keys = [k for k in self.state if k.startswith(src_prefix)]
        if not keys:
            raise ConversionError(f"the checkpoint has no tensors under {src_prefix!r}")
        for key in keys:
            rest, tensor = key[len(src_prefix):], self.state.pop(key)
            items = transform(rest, tensor) if transform else {rest: tensor}
            for name, value in items.items():
                self.out[dst_prefix + name] = value

    def finish(self) -> dict[str, torch.Tensor]:
        if self.state:
            names = sorted(self.state)
            raise ConversionError(
                f"{len(names)} tensor(s) of the checkpoint have no place in the native model, e.g. "
                f"{', '.join(names[:5])}: this checkpoint differs from the layout the converter knows")
        return self.out


def load_native(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load converted tensors into a freshly built native model; every parameter must be covered."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        details = [f"{label}: {', '.join(keys[:5])}" for label, keys in
                   (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ConversionError("converted weights do not fit the native model (" + "; ".join(details) + ")")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def source_dtype(config: dict) -> torch.dtype:
    """The dtype the original checkpoint declares (weights are written in it, never silently cast)."""
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConversionError(f"config.json: torch_dtype = {name!r} is not a floating-point dtype; a checkpoint to "
                              f"convert holds float32, float16 or bfloat16 weights: fix torch_dtype (or remove it "
                              f"for float32)")
    return dtype


def has_tokenizer(src: Path) -> bool:
    src = Path(src)
    return any((src / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def load_tokenizer(src: Path, **named_tokens: str):
    """The source's tokenizer through the native classes only (trust_remote_code stays off).

    ``named_tokens`` (``start_image_token="<img>"``, ...) become named special tokens, saved with it.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src), trust_remote_code=False, **named_tokens)
    except Exception as exc:  # noqa: BLE001 - re-raised with what to do
        raise ConversionError(f"the tokenizer files in {src} do not load with the native tokenizer classes "
                              f"({type(exc).__name__}: {exc}); remove them to convert the model alone") from exc


def read_family_config(src: Path, model_types, architectures, name: str) -> dict:
    """The original config.json, refused unless its model_type or architectures name the family."""
    config = read_config(src)
    model_type, archs = config.get("model_type"), config.get("architectures") or []
    if model_type not in model_types and not set(archs) & set(architectures):
        raise ConversionError(f"config.json: model_type {model_type!r} / architectures {archs} is not {name}")
    return config
