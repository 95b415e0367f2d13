"""``vlmprune convert``: remote-code checkpoints of the study's families -> native transformers checkpoints.

Bunny-v1.0 (``BunnyPhiForCausalLM``) becomes a ``LlavaForConditionalGeneration`` (SigLIP + Phi);
Mini-InternVL-Chat-V1-5 (``InternVLChatModel``) becomes an ``InternVLForConditionalGeneration``
(InternViT + Phi-3). The source is read as data (config.json, safetensors, tokenizer files); its
Python code is never imported. The output is written by the native model's ``save_pretrained``
(safetensors only) with the processor beside it, atomically, plus ``conversion.json`` recording
what was converted and how.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlmprune.convert import bunny, internvl_chat
from vlmprune.convert.common import ConversionError
from vlmprune.convert.detect import CONVERSION_FILE, convert_hint, detect_family, no_tokenizer_fix, refuse_original
from vlmprune.vocab import CONVERT_FAMILIES

__all__ = ["FAMILIES", "ConversionError", "convert", "convert_hint", "detect_family", "refuse_original"]

# the converter of each name `vlmprune convert --from` takes, in the vocabulary's order
FAMILIES = dict(zip(CONVERT_FAMILIES, (bunny, internvl_chat), strict=True))
RECORD_FILE = CONVERSION_FILE
log = logging.getLogger(__name__)


def convert(family: str, source: str | Path, output: str | Path, overwrite: bool = False,
            vision_tower: str | Path | None = None, image_token_id: int | None = None) -> Path:
    """Convert ``source`` (a local checkpoint directory of ``family``) into a native checkpoint at ``output``."""
    from vlmprune.checkpoint import save_model

    if family not in FAMILIES:
        raise ConversionError(f"--from must be one of {', '.join(FAMILIES)}, got {family!r}")
    source = Path(source)
    if not source.is_dir():
        raise ConversionError(f"{source} is not a directory; download the original checkpoint first, e.g. "
                              f"`hf download <hub id> --local-dir {source}`")
    found = detect_family(_read(source))
    if found is not None and found != family:
        raise ConversionError(f"{source} is a {found} checkpoint; use --from {found}")
    if family == "bunny":
        if image_token_id is not None:
            raise ConversionError("--image-token-id applies to --from internvl-chat only (Bunny's image token is "
                                  "added to its tokenizer)")
        model, processor, record = bunny.build(source, vision_tower=vision_tower)
    else:
        if vision_tower is not None:
            raise ConversionError("--vision-tower applies to --from bunny only (InternVL checkpoints contain "
                                  "their vision config)")
        model, processor, record = internvl_chat.build(source, image_token_id=image_token_id)
    record.update(source=str(source.resolve()), processor_written=processor is not None)
    if processor is None:
        log.warning("%s has no tokenizer files, so the converted model will have no processor: prune with "
                    "calibration data, recover and evaluate need one. To write it, %s%s", source,
                    no_tokenizer_fix(source), "" if family == "bunny" else
                    " (--image-token-id is then read from the tokenizer)")

    def write_record(tmp: Path) -> None:
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")

    # save_model with a processor saves it instead of copying the source's files: the source's
    # tokenizer_config may name remote-code classes (auto_map), which the native one must not.
    return save_model(model, output, processor=processor, overwrite=overwrite, extras=write_record)


def _read(source: Path) -> dict:
    from vlmprune.convert.common import read_config

    return read_config(source)
