"""Export a (pruned) model to the runtimes edge devices run: GGUF for llama.cpp (text model + mmproj), and
one ExecuTorch program (``vlmprune.export.pte.export_executorch``: model.pte for PyTorch's on-device runtime).

``export_gguf`` loads the checkpoint as ``vlmprune.load`` does (per-layer widths included), decides
what llama.cpp can hold (refusing, with the reason and the fix, before anything is written), and
writes ``model.gguf``, ``mmproj.gguf`` and ``export.json`` into the output directory whole or not
at all (the project's output guard).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from vlmprune.errors import VlmpruneError

log = logging.getLogger("vlmprune")

TEXT_FILE = "model.gguf"
MMPROJ_FILE = "mmproj.gguf"
RECORD_FILE = "export.json"


def export_gguf(model_dir: str | Path, output: str | Path, quant: str = "f16", overwrite: bool = False,
                vision: bool = True, vision_quant: str | None = None, trust_remote_code: bool = False) -> dict:
    """Write the GGUF pair of ``model_dir`` into ``output``; return the record (also in export.json).

    ``quant`` applies to the text model's matrices; the mmproj is written in ``vision_quant``
    (default: f16 when ``quant`` is a quantized type, else ``quant``).
    """
    from vlmprune import __version__
    from vlmprune.adapters import get_adapter
    from vlmprune.checkpoint import load, load_processor
    from vlmprune.export import gguf as text
    from vlmprune.export import gguf_vision as visual
    from vlmprune.paths import GGUF, atomic_output_dir, check_output

    text.check_quant(quant)
    vision_quant = vision_quant or (quant if quant in ("f32", "f16", "bf16") else "f16")
    text.check_quant(vision_quant)
    if vision_quant not in text.NUMPY_QUANTS:
        raise VlmpruneError(f"--vision-quant {vision_quant}: the mmproj is written in one of "
                            f"{', '.join(text.NUMPY_QUANTS)} (K-quant mixes are for the text model)")
    check_output(output, [("input model", model_dir)], overwrite, kind=GGUF)  # before the (slow) load
    # in the checkpoint's own dtype (a 7B bf16 model: 14 GB, not 28); each tensor goes to float32 only
    # while it is converted
    model = load(model_dir, trust_remote_code=trust_remote_code)
    adapter = get_adapter(model)
    text_plan = text.plan_text(model, adapter)  # refusals come before anything is written
    if vision:
        visual.check_family(model)
    try:
        processor = load_processor(model_dir, trust_remote_code=trust_remote_code)
    except VlmpruneError:
        if vision:
            raise
        import transformers  # the text model alone needs only the tokenizer

        processor = transformers.AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    vision_plan = visual.plan_vision(model, adapter, processor) if vision else None
    name = Path(str(model_dir)).name
    template = getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", processor),
                                                                      "chat_template", None)
    record: dict = {"vlmprune": __version__, "source": str(model_dir), "quant": quant}
    tokenizer = getattr(processor, "tokenizer", processor)
    with tempfile.TemporaryDirectory() as tok_dir:
        folder = Path(str(model_dir))
        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            tokenizer.save_pretrained(tok_dir)
            folder = Path(tok_dir)
        tok = text.TokenizerSource(folder, template if isinstance(template, str) else None, tokenizer)
        text.check_tokenizer(tok)  # a tokenizer llama.cpp would split differently: refused before writing
        with atomic_output_dir(output, overwrite=overwrite, inputs=[("input model", model_dir)],
                               kind=GGUF) as tmp:
            _write(tmp, record, model, adapter, text_plan, vision_plan, tok, quant, vision_quant, name)
    record["output"] = str(Path(output).resolve())
    return record


def export_executorch(*args, **kwargs) -> dict:
    """See :func:`vlmprune.export.pte.export_executorch`."""
    from vlmprune.export.pte import export_executorch as run

    return run(*args, **kwargs)


def _write(tmp: Path, record: dict, model, adapter, text_plan, vision_plan, tok, quant: str, vision_quant: str,
           name: str) -> None:
    import torch

    from vlmprune.export import gguf as text
    from vlmprune.export import gguf_vision as visual

    with torch.no_grad():
        record["text"] = text.write_text_gguf(tmp / TEXT_FILE, model, adapter, text_plan, tok, quant, name)
        if vision_plan is not None:
            record["mmproj"] = visual.write_mmproj(tmp / MMPROJ_FILE, model, adapter, vision_plan, vision_quant, name)
    (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")


__all__ = ["MMPROJ_FILE", "RECORD_FILE", "TEXT_FILE", "VlmpruneError", "export_executorch", "export_gguf"]
