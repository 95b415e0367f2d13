"""Paths: where outputs may go, how they are written whole or not at all, and what a model folder must hold.

Nothing here imports torch or transformers, so commands can check their paths before loading anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from vlmprune.errors import VlmpruneError
from vlmprune.readers import parse_json, read_json

MARKER = ".vlmprune-output"  # in every directory vlmprune writes: --overwrite replaces only those
_HELD: dict[Path, int] = {}  # output -> fd of the lock this process holds on it


def _relation(output: Path, other: Path) -> str | None:
    if output == other:
        return "is"
    if other.is_relative_to(output):
        return "contains"
    if output.is_relative_to(other):
        return "lies inside"
    return None


def check_output(output: str | Path, inputs: Iterable[tuple[str, str | Path | None]] = (),
                 overwrite: bool = False) -> Path:
    """Refuse an output that would destroy something, before any work starts; return it resolved.

    ``inputs`` are (what, path) pairs of the command (model, data, image folder, ...). The output
    may not be, contain or lie inside any of them, nor be or contain the current directory or the
    home directory; it may not be a file; an existing non-empty directory is replaced only with
    ``overwrite`` and only when vlmprune wrote it (it holds the ``.vlmprune-output`` marker).
    """
    out = Path(output).expanduser().resolve()
    for what, path in ((".", Path.cwd()), ("your home directory", Path.home())):
        relation = _relation(out, path.resolve())
        if relation in ("is", "contains"):
            raise VlmpruneError(f"--output {output} {relation} {'the current directory' if what == '.' else what}; "
                                f"writing there would replace it: choose a new directory, e.g. --output {out / 'out'}"
                                if relation == "is" else
                                f"--output {output} contains {'the current directory' if what == '.' else what}; "
                                f"replacing it would delete it: choose a new directory")
    for what, path in inputs:
        if path is None or not Path(path).expanduser().exists():
            continue
        relation = _relation(out, Path(path).expanduser().resolve())
        if relation is not None:
            raise VlmpruneError(f"--output {output} {relation} the {what} {path}: an output must be a new directory "
                                f"outside every input, or the {what} would be overwritten or copied into itself")
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise VlmpruneError(f"--output {output} is an existing file, not a directory: choose a directory path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise VlmpruneError(f"output directory {out} exists and is not empty; choose another or pass --overwrite")
        if not (out / MARKER).exists():
            raise VlmpruneError(f"output directory {out} is not empty and was not written by vlmprune "
                                f"(no {MARKER} file): --overwrite replaces only vlmprune outputs; remove it "
                                f"yourself or choose another")
    return out


@contextlib.contextmanager
def claim_output(output: str | Path, inputs: Iterable[tuple[str, str | Path | None]] = (),
                 overwrite: bool = False) -> Iterator[Path]:
    """Check ``output`` and hold an exclusive lock on it for the block (one writer per output).

    The lock is a ``flock`` on ``.<name>.lock`` beside the output, released by the kernel when the
    process dies, so a killed run never blocks the next. Under the lock, temporaries that killed
    runs left (``.<name>.tmp-*``, ``.<name>.old-*``) are removed. Re-entrant within a process.
    """
    out = check_output(output, inputs, overwrite)
    if out in _HELD:
        yield out
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VlmpruneError(f"another vlmprune run is writing {out} right now (lock {lock_path}); wait for it "
                                f"to finish or choose another --output") from None
        try:  # the file may have been unlinked by its last holder between our open and flock
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    _HELD[out] = fd
    try:
        for stale in list(out.parent.glob(f".{out.name}.tmp-*")) + list(out.parent.glob(f".{out.name}.old-*")):
            shutil.rmtree(stale, ignore_errors=True)
        yield out
    finally:
        del _HELD[out]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


@contextlib.contextmanager
def atomic_output_dir(output: str | Path, overwrite: bool = False,
                      inputs: Iterable[tuple[str, str | Path | None]] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``output`` only if the block succeeds.

    The output is checked and locked (:func:`claim_output`) around the write, so two runs can never
    both put a directory there, and the checks are repeated under the lock.
    """
    with claim_output(output, inputs, overwrite) as out:
        check_output(out, (), overwrite)  # again under the lock: another run may have finished meanwhile
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            yield tmp
            (tmp / MARKER).write_text("written by vlmprune; --overwrite may replace this directory\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def check_model_source(path: str | Path, what: str = "model") -> str:
    """A local model directory that holds a config and complete safetensors weights, or a hub id.

    Catches, before transformers sees them: a path that does not exist (which transformers would
    take for a malformed hub id), a file, a folder without config.json, pickled weights only, no
    weights, and safetensors files cut short (an interrupted download or copy).
    """
    local = Path(path).expanduser()
    if not local.exists():
        text = str(path)
        if text.startswith((".", "/", "~")) or text.count("/") > 1 or not _HUB_ID.match(text):
            raise VlmpruneError(f"{what} directory not found: {text}; check the path (a hub id looks like org/name)")
        return text
    if not local.is_dir():
        raise VlmpruneError(f"{what} {path} is a file; give the directory that holds config.json and the weights")
    if not (local / "config.json").is_file():
        raise VlmpruneError(f"{what} directory {path} has no config.json: it is not a saved model (give the "
                            f"directory that save_pretrained wrote)")
    weights = sorted(local.glob("*.safetensors"))
    index = local / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(read_json(index)["weight_map"].values())
        except (VlmpruneError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise VlmpruneError(f"{index} is not a valid safetensors index ({err}); fetch the model again") from None
        missing = sorted(name for name in shards if not (local / name).is_file())
        if missing:
            raise VlmpruneError(f"{what} {path} lacks {len(missing)} weight shard(s) its index lists "
                                f"({', '.join(missing[:3])}); the download is incomplete: fetch it again")
    if not weights:
        pickled = sorted(f.name for f in local.iterdir() if f.name.endswith((".bin", ".pt", ".pth", ".ckpt")))
        raise VlmpruneError(f"{what} directory {path} has no *.safetensors weights"
                            + (f", only pickled ones ({', '.join(pickled[:3])}), which vlmprune never loads; convert "
                               f"them to safetensors first" if pickled else "; it holds a config but no model"))
    for file in weights:
        check_safetensors(file)
    return str(local)


def check_not_quantized(model: str | Path, command: str, what: str = "model") -> None:
    """Refuse a local model whose config.json says it is quantized: ``command`` changes full-precision weights."""
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        return
    try:
        data = read_json(config)
    except VlmpruneError:
        return  # loading it will say what is wrong
    quantization = data.get("quantization_config") if isinstance(data, dict) else None
    if quantization is None:
        return
    method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
    raise VlmpruneError(f"{what} {model} is quantized ({method}; its config.json has a quantization_config), and "
                        f"`vlmprune {command}` works on full-precision weights only: run it on the model before "
                        f"`vlmprune quantize` (run.json names it under quantization.source), then quantize the result")


def check_safetensors(file: Path) -> None:
    """Refuse a safetensors file whose header or data is cut short (read from its 8-byte length and JSON header)."""
    size = file.stat().st_size
    problem = None
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            problem = f"{size} bytes, shorter than a header"
        else:
            n = int.from_bytes(head, "little")
            if n > size - 8:
                problem = f"its header claims {n:,} bytes but the file has {size:,}"
            else:
                try:
                    header = parse_json(fh.read(n), "the header")
                    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                except (VlmpruneError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
                    problem = f"its header is not valid ({err})"
                else:
                    if 8 + n + end > size:
                        problem = f"{size:,} of {8 + n + end:,} bytes"
    if problem:
        raise VlmpruneError(f"weights file {file} is truncated or corrupt ({problem}); the download or copy was "
                            f"interrupted: fetch or copy it again")


def cache_root() -> Path:
    """vlmprune's user cache (``$XDG_CACHE_HOME/vlmprune``): the demo model and data sets."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlmprune"
