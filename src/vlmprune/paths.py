"""Paths: where outputs may go, how they are written whole or not at all, and what a model folder must hold.

Nothing here imports torch or transformers, so commands can check their paths before loading anything.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from vlmprune.errors import VlmpruneError
from vlmprune.readers import parse_json, read_json

MARKER = ".vlmprune-output"  # in every directory vlmprune writes: --overwrite replaces only those, of the same kind
_HELD: dict[Path, int] = {}  # output -> fd of the lock this process holds on it
log = logging.getLogger(__name__)

# What an output directory holds, written into its marker: --overwrite replaces an output only with one of its kind.
MODEL, DATA_SET, GGUF, STUDY = "model", "data set", "GGUF export", "study run"
NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits (bytes of one name, of a whole path)


def _relation(output: Path, other: Path) -> str | None:
    if output == other:
        return "is"
    if other.is_relative_to(output):
        return "contains"
    if output.is_relative_to(other):
        return "lies inside"
    return None


def sibling(out: Path, tag: str) -> Path:
    """``.NAME.TAG`` beside ``out`` (its lock, temporaries and moved-aside earlier version).

    Where the name would pass NAME_MAX with the tag and an 8-character suffix (a 250-character
    output name is legal, ``.NAME.lock`` is not), NAME is cut and a hash of the whole name added.
    """
    name = out.name
    if len(f".{name}.{tag}-00000000".encode()) > NAME_MAX:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = name.encode()[:100].decode(errors="ignore") + "~" + digest
    return out.parent / f".{name}.{tag}"


def written_kind(folder: Path) -> str | None:
    """What vlmprune wrote into ``folder`` (a model, a data set, ...), from its marker; None: not vlmprune's.

    Markers of versions that did not record the kind are read from what the folder holds.
    """
    marker = folder / MARKER
    if not marker.is_file():  # a study's run directory from before studies wrote the marker
        legacy_study = (folder / "cells").is_dir() and (folder / "resolved_config.yaml").is_file()
        return STUDY if legacy_study and not (folder / "config.json").exists() else None
    for line in marker.read_text(errors="replace").splitlines():
        if line.startswith("kind: "):
            return line.removeprefix("kind: ").strip()
    if (folder / "config.json").is_file():
        return MODEL
    if any(folder.glob("*.gguf")):
        return GGUF
    if (folder / "train.json").is_file() or (folder / "test.json").is_file():
        return DATA_SET
    return "output of an older vlmprune"


def write_marker(folder: Path, kind: str) -> None:
    (folder / MARKER).write_text(f"written by vlmprune; --overwrite may replace this directory with another {kind}\n"
                                 f"kind: {kind}\n")


def _check_length(output: str | Path, path: Path) -> None:
    too_long = [part for part in path.parts if len(part.encode()) > NAME_MAX]
    if too_long:
        raise VlmpruneError(f"--output {output}: the name {too_long[0][:40]}... has {len(too_long[0].encode())} bytes, "
                            f"more than the {NAME_MAX} a file name may have: choose a shorter name")
    if len(str(path).encode()) >= PATH_MAX:
        raise VlmpruneError(f"--output {str(output)[:60]}...: the path has {len(str(path).encode()):,} bytes, more "
                            f"than the {PATH_MAX:,} a path may have: choose a shorter path")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(output: str | Path, out: Path) -> None:
    """The folder the output goes into exists or can be made, and can be written (before any work)."""
    if out.is_dir():
        return _check_folder_writable(output, out.parent)
    parent = _nearest_existing(out.parent)
    if not parent.is_dir():
        raise VlmpruneError(f"--output {output}: {parent} is a file, not a folder, so nothing can be written under it: "
                            f"choose a path whose parent folders are folders")
    _check_folder_writable(output, parent)


def _check_folder_writable(output: str | Path, folder: Path) -> None:
    if os.access(folder, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise VlmpruneError(f"--output {output}: {folder} is on a read-only file system: choose an --output on a "
                            f"writable disk")
    raise VlmpruneError(f"--output {output}: the folder {folder} cannot be written (permission denied, or it is "
                        f"immutable: see ls -ld and lsattr -d): choose another --output or fix its permissions")


def output_problem(exc: BaseException, out: Path) -> str | None:
    """The message for an error of the file system while writing ``out`` (None: not such an error).

    Disk full is recognised in any exception (safetensors and torch wrap the OS error in their own);
    the others only as an OSError about a path in the output's folder.
    """
    code = exc.errno if isinstance(exc, OSError) else None
    text = str(exc)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text or "StorageFull" in text \
            or "Disk quota exceeded" in text:
        return (f"the disk is full (no space left on the device) while writing {out}: the partial output and its "
                f"temporaries were removed and nothing was written there; free some space, or choose an --output on "
                f"another disk, and run again")
    if not isinstance(exc, OSError) or exc.filename is None:
        return None
    where = Path(os.fsdecode(exc.filename)).absolute()
    if not (where.is_relative_to(out.parent) or out.is_relative_to(where)):
        return None
    if code == errno.EROFS:
        return f"cannot write {where}: read-only file system; choose an --output on a writable disk"
    if code in (errno.EACCES, errno.EPERM):
        return (f"cannot write {where}: permission denied (or the folder is immutable: see lsattr -d {out.parent}); "
                f"choose another --output or fix the folder's permissions")
    if code == errno.ENAMETOOLONG:
        return f"cannot write {where}: the name or path is too long for the file system; choose a shorter --output"
    if code in (errno.ENOTDIR, errno.EEXIST) and not where.is_dir():
        return f"cannot write {where}: a parent of the output is a file, not a folder; choose another --output"
    return None


@contextlib.contextmanager
def output_errors(out: Path) -> Iterator[None]:
    """Turn a file-system failure while writing ``out`` (disk full, read-only, permission) into its message."""
    try:
        yield
    except VlmpruneError:
        raise
    except Exception as exc:
        problem = output_problem(exc, out)
        if problem is None:
            raise
        raise VlmpruneError(problem) from None


def check_output(output: str | Path, inputs: Iterable[tuple[str, str | Path | None]] = (),
                 overwrite: bool = False, kind: str = MODEL, resume: bool = False) -> Path:
    """Refuse an output that would destroy something, before any work starts; return it resolved.

    ``inputs`` are (what, path) pairs of the command (model, data, image folder, ...). The output
    may not be, contain or lie inside any of them, nor be or contain the current directory or the
    home directory; it may not be a file, nor lie under one; its folder must be writable. An existing
    non-empty directory is replaced only with ``overwrite``, only when vlmprune wrote it (it holds
    the ``.vlmprune-output`` marker) and only when it holds the same ``kind`` of output (a model never
    replaces a data set). With ``resume`` (a study), an existing directory of the same kind is
    continued instead; any other is refused.
    """
    _check_length(output, Path(output).expanduser().absolute())
    out = Path(output).expanduser().resolve()
    _check_length(output, out)
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
    _check_writable(output, out)
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise VlmpruneError(f"--output {output} is an existing file, not a directory: choose a directory path")
    if out.is_dir() and any(out.iterdir()):
        found = written_kind(out)
        if resume:
            if found != kind:
                raise VlmpruneError(f"--output {output} exists and is not a {kind} ("
                                    + (f"it holds a {found} vlmprune wrote" if found else "vlmprune did not write it")
                                    + f"): a {kind} is written into a new directory or continues its own; choose "
                                      f"another")
            return out
        if not overwrite:
            raise VlmpruneError(f"output directory {out} exists and is not empty; choose another or pass --overwrite")
        if found is None:
            raise VlmpruneError(f"output directory {out} is not empty and was not written by vlmprune "
                                f"(no {MARKER} file): --overwrite replaces only vlmprune outputs; remove it "
                                f"yourself or choose another")
        if found != kind:
            raise VlmpruneError(f"output directory {out} holds a {found} that vlmprune wrote, and this command writes "
                                f"a {kind}: --overwrite replaces an output only with one of its kind; choose another "
                                f"directory (or remove it yourself)")
    return out


def _restore_moved_aside(out: Path) -> None:
    """A kill between the two renames of a replacement leaves the earlier output only as ``.NAME.old-*``:
    when the output is missing, that is the user's data; put it back before anything else (under the lock)."""
    if out.exists():
        return
    olds = sorted(out.parent.glob(sibling(out, "old-").name + "*"))
    if len(olds) == 1:
        olds[0].rename(out)
        log.warning("restored %s from %s: a run killed while it replaced that output had moved it aside", out,
                    olds[0].name)
    elif olds:
        raise VlmpruneError(f"{out} is missing and {len(olds)} earlier versions a killed run moved aside lie beside "
                            f"it ({', '.join(p.name for p in olds)}): rename the one to keep back to {out.name} and "
                            f"remove the others, then run again")


@contextlib.contextmanager
def claim_output(output: str | Path, inputs: Iterable[tuple[str, str | Path | None]] = (),
                 overwrite: bool = False, kind: str = MODEL, resume: bool = False) -> Iterator[Path]:
    """Check ``output`` and hold an exclusive lock on it for the block (one writer per output).

    The lock is a ``flock`` on ``.<name>.lock`` beside the output, released by the kernel when the
    process dies, so a killed run never blocks the next. Under the lock, an earlier output that a
    killed run had moved aside is restored when the output is missing, the checks are repeated, and
    temporaries that killed runs left (``.<name>.tmp-*``, ``.<name>.old-*``) are removed. File-system
    failures in the block (disk full, read-only, permission) become messages. Re-entrant within a process.
    """
    inputs = list(inputs)
    out = check_output(output, inputs, overwrite, kind, resume)
    if out in _HELD:
        yield out
        return
    with output_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        lock_path = sibling(out, "lock")
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
            _restore_moved_aside(out)
            check_output(out, inputs, overwrite, kind, resume)  # again under the lock (and after a restore)
            stale = [path for tag in ("tmp-", "old-") for path in out.parent.glob(sibling(out, tag).name + "*")]
            for path in stale:  # the output is in place: these are leftovers of killed runs
                shutil.rmtree(path, ignore_errors=True)
            yield out
        finally:
            del _HELD[out]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)
            os.close(fd)


def _fresh_dir(out: Path) -> Path:
    """An empty ``.NAME.tmp-XXXXXXXX`` beside ``out``, with the usual mode (umask), not mkdtemp's 0700."""
    while True:
        path = sibling(out, f"tmp-{secrets.token_hex(4)}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_output_dir(output: str | Path, overwrite: bool = False,
                      inputs: Iterable[tuple[str, str | Path | None]] = (), kind: str = MODEL) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``output`` only if the block succeeds.

    The output is checked and locked (:func:`claim_output`) around the write, so two runs can never
    both put a directory there, and the checks are repeated under the lock. The earlier output a
    replacement moves aside is deleted only once the new one is in place.
    """
    with claim_output(output, inputs, overwrite, kind) as out:
        tmp = _fresh_dir(out)
        try:
            yield tmp
            write_marker(tmp, kind)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if out.exists():
            trash = sibling(out, f"old-{tmp.name[-8:]}")
            out.rename(trash)
            try:
                tmp.rename(out)
            except BaseException:
                trash.rename(out)
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)


def check_output_file(output: str | Path, inputs: Iterable[tuple[str, str | Path | None]] = (),
                      overwrite: bool = False, ours: Callable[[Path], bool] = lambda path: False,
                      what: str = "results") -> Path:
    """Refuse an output FILE that would destroy something; return it resolved.

    It may not be one of ``inputs`` or lie inside one (a model folder, a data folder); an existing
    file is replaced only with ``overwrite`` and only when ``ours(path)`` says this command wrote it.
    """
    _check_length(output, Path(output).expanduser().absolute())
    out = Path(output).expanduser().resolve()
    _check_length(output, out)
    if out.is_dir():
        raise VlmpruneError(f"--output {output} is a directory; give a file path such as {out / 'results.json'}")
    for name, path in inputs:
        if path is None or not Path(path).expanduser().exists():
            continue
        relation = _relation(out, Path(path).expanduser().resolve())
        if relation is not None:
            raise VlmpruneError(f"--output {output} {relation} the {name} {path}: write the {what} to a new file "
                                f"outside every input, or the {name} would be overwritten")
    _check_writable(output, out)
    if out.exists():
        if not overwrite:
            raise VlmpruneError(f"--output {output} exists; choose another file or pass --overwrite")
        if not ours(out):
            raise VlmpruneError(f"--output {output} exists and is not {what} vlmprune wrote: --overwrite replaces "
                                f"only those; remove it yourself or choose another file")
    return out


def write_output_file(out: Path, text: str) -> None:
    """Write ``text`` to ``out`` whole or not at all (a temporary sibling renamed into place, removed on failure)."""
    with output_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = sibling(out, f"tmp-{secrets.token_hex(4)}")
        try:
            tmp.write_text(text)
            tmp.replace(out)  # readers never see half a file
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


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
