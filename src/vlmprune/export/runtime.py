"""Run an exported GGUF pair in llama.cpp (the ``xllamacpp`` binding, ``pip install vlmprune[gguf]``).

``LlamaCppModel`` answers (image, question) turns through llama.cpp's own chat API: the chat template
embedded in model.gguf renders the turn, libmtmd encodes the image with mmproj.gguf, decoding is
greedy. ``vlmprune.evaluate.gguf`` scores tasks with it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path

from vlmprune.errors import VlmpruneError

MEDIA_MARKER = "<__media__>"


def is_gguf_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "model.gguf").is_file()


def _require_xllamacpp():
    try:
        import xllamacpp
    except ImportError:
        raise VlmpruneError("running a GGUF model needs llama.cpp's Python binding: pip install 'vlmprune[gguf]' "
                            "(xllamacpp, a prebuilt CPU wheel)") from None
    return xllamacpp


class LlamaCppModel:
    """llama.cpp on ``folder/model.gguf`` (+ ``mmproj.gguf`` when present), in this process."""

    def __init__(self, folder: str | Path, n_ctx: int = 2048, threads: int | None = None):
        # llama-server draws a random media marker per process unless this is set (read at first use)
        os.environ.setdefault("LLAMA_MEDIA_MARKER", MEDIA_MARKER)
        xlc = _require_xllamacpp()
        folder = Path(folder)
        if not is_gguf_dir(folder):
            raise VlmpruneError(f"{folder} has no model.gguf: give a directory `vlmprune export --format gguf` wrote")
        params = xlc.CommonParams()
        params.model.path = str(folder / "model.gguf")
        self.has_vision = (folder / "mmproj.gguf").is_file()
        if self.has_vision:
            params.mmproj.path = str(folder / "mmproj.gguf")
        params.n_ctx = n_ctx
        params.n_parallel = 1
        # one core left free: llama.cpp's OpenMP threads spin, and on a shared 2-core machine two of them
        # ran 30-100x slower than one (217 vs 7 prompt tokens/s, 47.6 vs 0.4 decode tokens/s, demo q8_0)
        params.cpuparams.n_threads = threads or max(1, len(os.sched_getaffinity(0)) - 1)
        params.cpuparams_batch.n_threads = params.cpuparams.n_threads
        params.warmup = False
        # llama.cpp logs every load and request step to stderr (20+ lines a model, a few a request); its
        # failures reach us as exceptions, so its log is shown only when vlmprune's own is at DEBUG
        params.verbosity = 3 if logging.getLogger("vlmprune").isEnabledFor(logging.DEBUG) else -1
        try:
            self.server = xlc.Server(params)
        except RuntimeError as exc:
            raise VlmpruneError(f"llama.cpp could not load {folder}: {exc}") from None

    def chat(self, messages: list[dict], max_tokens: int = 10) -> dict:
        out = self.server.handle_chat_completions({"messages": messages, "max_tokens": max_tokens,
                                                   "temperature": 0.0, "cache_prompt": False})
        if isinstance(out, str):
            out = json.loads(out)
        if "error" in out:
            raise VlmpruneError(f"llama.cpp refused the request: {out['error'].get('message', out['error'])}")
        return out

    def answer(self, image: str | Path | None, question: str, max_new_tokens: int = 10) -> tuple[str, dict]:
        """The greedy answer to one user turn (the image first, then the text, as the HF evaluator
        builds it) and llama.cpp's usage/timings record."""
        content: list[dict] = []
        if image is not None:
            if not self.has_vision:
                raise VlmpruneError("this GGUF export has no mmproj.gguf: it cannot take images")
            data = base64.b64encode(Path(image).read_bytes()).decode()
            content.append({"type": "image_url", "image_url": {"url": f"data:image/{_kind(image)};base64,{data}"}})
        content.append({"type": "text", "text": question})
        out = self.chat([{"role": "user", "content": content}], max_tokens=max_new_tokens)
        text = out["choices"][0]["message"].get("content") or ""
        return text.strip(), {"usage": out.get("usage", {}), "timings": out.get("timings", {})}


def _kind(path: str | Path) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    return {"jpg": "jpeg", "": "png"}.get(suffix, suffix)
