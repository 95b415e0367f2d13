"""Which convertible family an original (remote-code) checkpoint belongs to, and what to tell a user who
passes one to vlmprune unconverted.

It imports nothing of :mod:`vlmprune.checkpoint`, which calls :func:`refuse_original` before it loads
a config: the checkpoint I/O stands below ``convert`` (whose :func:`~vlmprune.convert.convert` saves
with it), and this module, which imports nothing else of ``convert``, is the one piece of it that
checkpoint needs.
"""

from __future__ import annotations

from pathlib import Path

from vlmprune.errors import UnsupportedModelError, VlmpruneError
from vlmprune.readers import read_json

CONVERSION_FILE = "conversion.json"  # what `vlmprune convert` records beside the checkpoint it writes
# the files of the source's tokenizer that `vlmprune convert` reads (one of the first three is needed)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json",
                   "special_tokens_map.json")

# What marks each convertible family's original config.json: (model_type values, architectures).
SIGNATURES = {"bunny": (("bunny-phi",), ("BunnyPhiForCausalLM",)),
              "internvl-chat": (("internvl_chat",), ("InternVLChatModel",))}


def no_tokenizer_fix(source: str | Path) -> str:
    """What to do about a convert source without tokenizer files: the files to add, then convert again."""
    return (f"copy the original checkpoint's tokenizer files ({', '.join(TOKENIZER_FILES[:2])} or "
            f"{TOKENIZER_FILES[2]}, with {', '.join(TOKENIZER_FILES[3:])}) into {source} and run `vlmprune convert` "
            f"again")


def converted_without_processor(folder: str | Path) -> str | None:
    """For a checkpoint `vlmprune convert` wrote without a processor (its source had no tokenizer): the fix."""
    try:
        record = read_json(Path(folder) / CONVERSION_FILE)
    except VlmpruneError:
        return None
    if not isinstance(record, dict) or record.get("processor_written") is not False:
        return None
    return (f"{folder} was converted by `vlmprune convert` from {record.get('source', 'a source')}, which had no "
            f"tokenizer files: {no_tokenizer_fix(record.get('source', 'the source'))}")


def detect_family(config: dict) -> str | None:
    """The ``--from`` family of an original config.json (a dict), or None when it is not convertible."""
    archs = set(config.get("architectures") or [])
    for name, (model_types, architectures) in SIGNATURES.items():
        if config.get("model_type") in model_types or archs & set(architectures):
            return name
    return None


def convert_hint(source: str | Path) -> str | None:
    """What to tell a user who passes an unconverted checkpoint of a convertible family to vlmprune.

    Reads the local ``config.json``, or for a hub id the one ``AutoConfig`` would fetch next
    (from the hub cache when it is there); None when there is none or it is not a convertible family.
    """
    path = Path(str(source)) / "config.json"
    if not path.is_file():
        if Path(str(source)).exists():  # a local directory without config.json is no hub id
            return None
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(source), "config.json"))
        except Exception:  # noqa: BLE001 - not a repo id, offline, gated...: AutoConfig will say why
            return None
    try:
        config = read_json(path)
    except VlmpruneError:
        return None
    family = detect_family(config) if isinstance(config, dict) else None
    if family is None:
        return None
    kind = config.get("model_type") or ", ".join(config.get("architectures") or [])
    local = Path(str(source)).is_dir()
    name = Path(str(source)).name
    first = "" if local else f"hf download {source} --local-dir {name}-src && "
    src = source if local else f"{name}-src"
    return (f"{source} is an original remote-code checkpoint ({kind}) that vlmprune does not load; convert it to "
            f"a native transformers checkpoint first: {first}vlmprune convert --from {family} {src} --output "
            f"{name}-native, then pass that directory instead")


def refuse_original(source: str | Path) -> None:
    """Raise ``UnsupportedModelError`` with the convert command for an original Bunny / InternVL-Chat checkpoint."""
    if (hint := convert_hint(source)) is not None:
        raise UnsupportedModelError(hint)
