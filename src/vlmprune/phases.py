"""Where a command spends time and memory: wall time and peak RSS per phase.

``vlmprune prune`` records its phases (``PHASES``) and writes the result into ``run.json``
as its prune section's ``"cost"`` (also ``PruneResult.cost``). Code marks a phase with ``with phase("load"):``;
outside an active :func:`recording` that is a no-op. Phases nest: an inner phase pauses the outer
one, so every second of the recording belongs to exactly one phase, and time in no named phase is
``"other"``.

Peak RSS per phase: at every phase change the kernel's peak-RSS counter (VmHWM) is read, then reset
to the current RSS by writing ``5`` to ``/proc/self/clear_refs``; a phase's peak is the highest
VmHWM over its stretches. Where the reset is not permitted (or there is no ``/proc``), VmHWM (or
``getrusage``) only grows, each phase's figure is the process's peak up to the end of that phase,
and the record says so (``"peak_per_phase": false``). One phase change costs a write and a read of
a small ``/proc`` file (tens of microseconds); phases change a few times per calibration batch.

Also here: the glibc allocator settings the prune command uses (:func:`limit_malloc_arenas`,
:func:`trim_malloc`), which give freed memory back to the system (see docs/performance/prune-cost.md).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

from vlmprune.measure import peak_rss_kib, reset_peak_rss, rss_kib, status_kib

PHASES = ("import", "load", "data", "calibration", "scoring", "planning", "compensation", "surgery", "save", "records",
          "other")

def process_age() -> float | None:
    """Seconds since this process started (10 ms resolution), from /proc; None without it."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return None


class PhaseRecorder:
    """Wall time and peak RSS per phase, from its creation (or from the process's start) to ``record()``."""

    def __init__(self, since_process_start: bool = False):
        now = time.perf_counter()
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.cpu_seconds = dict.fromkeys(PHASES, 0.0)  # this process's CPU time, all threads: other jobs on
        # the machine inflate wall time, much less CPU time
        self.peak_kib: dict[str, int | None] = dict.fromkeys(PHASES, None)
        self.rss_start_kib: dict[str, int | None] = dict.fromkeys(PHASES, None)  # RSS entering its first stretch
        self.rss_end_kib: dict[str, int | None] = dict.fromkeys(PHASES, None)  # RSS leaving its last stretch
        self.rss = None
        self.scope = "call"
        self.start = now
        if since_process_start:
            age = process_age()
            if age is not None:  # the interpreter and everything imported so far: the import phase
                self.scope = "process"
                self.start = now - age
                self.seconds["import"] = age
                self.cpu_seconds["import"] = time.process_time()
                self.peak_kib["import"] = peak_rss_kib()
        self.stack = ["other"]
        self.rss = rss_kib()
        self.rss_start_kib["other"] = self.rss
        if self.scope == "process":
            self.rss_end_kib["import"] = self.rss
        self.peak_per_phase = reset_peak_rss()
        self.mark = now
        self.cpu_mark = time.process_time()

    def _close(self) -> float:
        """End the current stretch of the phase on top: its time and its peak since the last reset."""
        now, cpu = time.perf_counter(), time.process_time()
        top = self.stack[-1]
        self.seconds[top] += now - self.mark
        self.cpu_seconds[top] += cpu - self.cpu_mark
        status = status_kib("VmHWM", "VmRSS")
        peak = status.get("VmHWM")
        if peak is None:
            peak = peak_rss_kib()
        self.rss = self.rss_end_kib[top] = status.get("VmRSS")
        if peak is not None:
            old = self.peak_kib[top]
            self.peak_kib[top] = peak if old is None else max(old, peak)
        if self.peak_per_phase:
            reset_peak_rss()
        self.mark, self.cpu_mark = now, cpu  # this bookkeeping counts in the next stretch: the phases add up
        return now

    def enter(self, name: str) -> None:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases: {', '.join(PHASES)}")
        self._close()
        self.stack.append(name)
        if self.rss_start_kib[name] is None:
            self.rss_start_kib[name] = self.rss

    def exit(self) -> None:
        self._close()
        self.stack.pop()
        if not self.stack:
            self.stack.append("other")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.stack[-1] == name:  # already in it (a helper called from inside the same phase)
            yield
            return
        self.enter(name)
        try:
            yield
        finally:
            self.exit()

    def record(self, weight_bytes: int | None = None) -> dict:
        """The cost so far, as JSON-ready data (the phase in progress is counted up to now)."""
        now = self._close()
        mib = lambda kib: None if kib is None else round(kib / 1024, 1)  # noqa: E731
        total = now - self.start
        peaks = [k for k in self.peak_kib.values() if k is not None]
        out = {
            "scope": self.scope,  # "process": from the interpreter's start; "call": from prune() being called
            "seconds": round(total, 3),
            "peak_rss_mib": mib(max(peaks)) if peaks else None,
            "peak_per_phase": self.peak_per_phase,
            "threads": _threads(),
            "cpu_seconds": round(sum(self.cpu_seconds.values()), 3),
            "phases": {name: {"seconds": round(self.seconds[name], 3), "cpu_seconds": round(self.cpu_seconds[name], 3),
                              "peak_rss_mib": mib(self.peak_kib[name]),
                              "rss_start_mib": mib(self.rss_start_kib[name]),
                              "rss_end_mib": mib(self.rss_end_kib[name])}
                       for name in PHASES},
        }
        if weight_bytes:
            out["weights_mib"] = round(weight_bytes / 2**20, 1)
            if out["peak_rss_mib"] is not None:
                out["peak_over_weights"] = round(out["peak_rss_mib"] * 2**20 / weight_bytes, 3)
        return out


def _threads() -> int | None:
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


_active: PhaseRecorder | None = None


def current() -> PhaseRecorder | None:
    """The active recorder, if a recording is under way."""
    return _active


@contextlib.contextmanager
def recording(since_process_start: bool = False) -> Iterator[PhaseRecorder]:
    """Activate a recorder for the block (or join the one already active)."""
    global _active
    if _active is not None:
        yield _active
        return
    _active = PhaseRecorder(since_process_start)
    try:
        yield _active
    finally:
        _active = None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the block as phase ``name`` of the active recording (nothing without one)."""
    if _active is None:
        yield
        return
    with _active.phase(name):
        yield


# ---------------------------------------------------------------------------------- glibc malloc


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only (musl has neither)
        return libc
    except (OSError, AttributeError):
        return None


_M_ARENA_MAX = -8


def limit_malloc_arenas(n: int = 1) -> bool:
    """Ask glibc for at most ``n`` malloc arenas (call it before threads start). With one arena per
    thread, memory freed in a worker thread's arena stays there; with one arena it is reused and
    trimmed. True if glibc took it."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, n) == 1)


def trim_malloc() -> bool:
    """Give the allocator's free memory back to the system (glibc's malloc_trim(0)); True if any was."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
