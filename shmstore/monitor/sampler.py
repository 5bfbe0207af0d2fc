"""`MemoryMonitor`: psutil sampling of the server and of its registered client processes.

A background thread samples, every ``interval`` seconds, the owning process's RSS (and
USS where the platform has it), the RSS (and, as often as USS, the PSS) of every
registered client, the store's checkpoint count and payload bytes, and the bytes of the
sealed memory segments the process holds (data-plane states: shared memory, outside its
RSS), into a bounded ring buffer.  Dead clients are marked
dead, not forgotten, until ``client_ttl`` seconds after they were last seen alive.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Callable

import psutil

from ..core import segment
from ..core.backend import ROLE_WORKER, ClientInfo, Sample
from ..core.validate import count, duration

__all__ = ["DEFAULT_HISTORY", "DEFAULT_INTERVAL", "MemoryMonitor"]

log = logging.getLogger("shmstore")

DEFAULT_INTERVAL = 0.5
DEFAULT_HISTORY = 1200
DEFAULT_CLIENT_TTL = 300.0
#: The most entries one `MemoryMonitor.history` answer holds (a sample and each client
#: in it count one), so that a store with many clients answers in bounded time and size.
HISTORY_ENTRIES = 100_000
USS_BUDGET = 0.005  # share of one CPU the server's USS readings may take
#: Shares of one CPU the clients' RSS and PSS readings may take: with many clients they
#: are read less often than the server (samples between carry the last readings), so
#: that 1000 clients cost under 2% of a CPU in all (bench/sampler_clients.py).
CLIENT_BUDGET = 0.005
PSS_BUDGET = 0.0025
#: Up to this many clients, every sample reads them all (a few reads cost nothing, and
#: every sample then shows a client's end at once); the budget applies above it.
CLIENT_BUDGET_FROM = 64
#: A client's pid is checked against its start time (pid reuse) every this many readings.
IDENTITY_EVERY = 16
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = sys.platform.startswith("linux")
TRIM_STEP = 32 * 1024 * 1024  # payload freed since the last trim that makes a trim worth it
PROC_STATUS = "/proc/self/status"


def malloc_trimmer() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``: hand free heap pages back to the system (None elsewhere).

    Freed checkpoints leave free chunks between live ones; glibc only returns the top of
    the heap by itself, so after a big clear the server's RSS would stay high (reused,
    not leaked, but not given back).  ``malloc_trim`` releases the free pages inside the
    heap too.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


#: glibc's mallopt parameter for the number of malloc arenas.
M_ARENA_MAX = -8
#: The server's arena cap: glibc gives each thread that contends for the allocator an
#: arena of its own (up to 8 per core), and a server with one thread per connection kept
#: 1.75-1.87x its payload resident with growing states (1.12x with the cap).  Python's
#: small objects come from its own allocator, under the GIL; only large buffers (states
#: on the socket path) go to malloc, and two arenas keep those from queueing.
ARENA_CAP = 2


def cap_malloc_arenas(limit: int = ARENA_CAP) -> int | None:
    """Limit glibc's malloc to ``limit`` arenas in this process (call it before starting
    threads); the cap in force, or None where there is none to set (not glibc, or the
    user chose one with ``MALLOC_ARENA_MAX``, which glibc itself reads and this keeps)."""
    chosen = os.environ.get("MALLOC_ARENA_MAX")
    if chosen is not None:
        return int(chosen) if chosen.isdigit() else None
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return limit if mallopt(M_ARENA_MAX, limit) == 1 else None


def _vm_hwm() -> int | None:
    """``VmHWM`` of ``/proc/self/status`` in bytes: this process's own peak RSS (Linux)."""
    try:
        with open(PROC_STATUS, "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss(rss: int) -> int:
    """This process's highest RSS in bytes, never less than ``rss`` (the RSS just read).

    On Linux it is ``VmHWM``: ``ru_maxrss`` survives ``exec``, so a server started from a
    3 GiB process would report 3 GiB.  If ``/proc`` cannot be read (out of descriptors),
    ``rss`` it is, and callers keep the highest they saw.  Elsewhere ``ru_maxrss``.
    """
    if sys.platform.startswith("linux"):
        peak = _vm_hwm()
        return rss if peak is None else max(rss, peak)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(rss, maxrss if sys.platform == "darwin" else maxrss * 1024)  # KiB but macOS


class OwnMemory:
    """This process's memory as a store reads it: RSS (cached briefly, for ``max_rss``,
    which is checked on every save) and the figures `stats` reports."""

    def __init__(self, max_age: float) -> None:
        self._process = psutil.Process(os.getpid())
        self.pid = self._process.pid
        self._max_age = max_age
        self._rss = 0
        self._rss_at = -1.0

    def rss(self) -> int:
        """Resident set size in bytes, re-read at most every ``max_age`` seconds."""
        now = time.monotonic()
        if now - self._rss_at > self._max_age:
            self._rss = self._process.memory_info().rss
            self._rss_at = now
        return self._rss

    def now(self) -> tuple[int, int]:
        """(RSS, peak RSS) in bytes, read now."""
        rss = self._process.memory_info().rss
        return rss, peak_rss(rss)


def _statm_rss(pid: int) -> int:
    """Resident bytes of ``pid`` from ``/proc/PID/statm``: one read, no psutil (~10x
    cheaper: a sampler reads every client every interval).  0 for a zombie.

    Raises:
        OSError: no such process (or no /proc).
    """
    fd = os.open(f"/proc/{pid}/statm", os.O_RDONLY)
    try:
        data = os.read(fd, 128)
    finally:
        os.close(fd)
    return int(data.split()[1]) * _PAGE


class _Client:
    __slots__ = ("alive", "last_seen", "leaving", "name", "peak_rss", "pid", "process", "pss",
                 "reads", "role", "rss")

    def __init__(self, pid: int, name: str, role: str = ROLE_WORKER) -> None:
        self.pid = pid
        self.name = name
        self.role = role
        self.leaving = False  # it said it was done: "exited" once it is gone, not "gone"
        self.process: psutil.Process | None = None
        with contextlib.suppress(psutil.Error):
            self.process = psutil.Process(pid)
        self.alive = self.process is not None
        self.rss = 0
        self.pss: int | None = None
        self.peak_rss = 0
        self.last_seen = time.time()
        self.reads = 0

    @property
    def state(self) -> str:
        """``alive``, ``exited`` (it said goodbye), or ``gone`` (it vanished: killed,
        crashed)."""
        if self.alive:
            return "alive"
        return "exited" if self.leaving else "gone"

    def _read_rss(self, process: psutil.Process, verify: bool) -> int:
        """Its resident bytes now, 0 once it has ended (a zombie, or exiting: its memory
        already gone).  One read of its statm on Linux; through psutil with ``verify``
        (or elsewhere), which also checks the pid still names this process."""
        try:
            if _STATM and not verify:
                return _statm_rss(self.pid)
            if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
                return 0
            return int(process.memory_info().rss)
        except (psutil.Error, OSError, ValueError, IndexError):
            return 0

    def check_alive(self) -> None:
        """Whether it still runs, read now (stats asks; samples refresh the rest)."""
        if self.alive and self.process is not None:
            self.alive = self._read_rss(self.process, verify=False) > 0

    def refresh(self, now: float) -> None:
        if not self.alive or self.process is None:
            return
        self.reads += 1
        rss = self._read_rss(self.process, verify=self.reads % IDENTITY_EVERY == 0)
        if not rss:
            self.alive = False
            return
        self.rss = rss
        self.peak_rss = max(self.peak_rss, self.rss)
        self.last_seen = now

    def refresh_pss(self) -> None:
        """Read PSS: pages shared with other processes (one data-plane checkpoint mapped
        by 8 readers) count an eighth in each, where RSS counts them whole in every one."""
        if not self.alive or self.process is None:
            return
        try:
            self.pss = getattr(self.process.memory_full_info(), "pss", None)
        except (psutil.Error, NotImplementedError, AttributeError):
            self.pss = None

    def to_dict(self) -> ClientInfo:
        return {"pid": self.pid, "name": self.name, "rss": self.rss, "peak_rss": self.peak_rss,
                "alive": self.alive, "pss": self.pss, "role": self.role, "state": self.state}


class MemoryMonitor:
    """Samples memory of this process and registered clients into a ring buffer.

    Parameters:
        figures: returns ``(checkpoints, payload_bytes)`` of the store being watched.
        largest: returns its largest executions, ``(execution, checkpoints, bytes)``
            largest first, for each sample's ``executions`` (None: samples have none).
        interval: seconds between samples (> 0).
        history_size: how many samples are kept (>= 1); older ones drop out.
        client_ttl: seconds a dead client stays listed.
        trim: after a sample finds ``TRIM_STEP`` bytes of payload freed on the heap
            (not in memory segments), ask the C allocator to return free memory to the
            system (glibc only; the server does).

    Example:
        >>> mon = MemoryMonitor(lambda: (0, 0), interval=0.1)
        >>> mon.start(); mon.register(os.getpid(), "me"); mon.stop()
    """

    def __init__(
        self,
        figures: Callable[[], tuple[int, int]],
        *,
        largest: Callable[[], list[tuple[str, int, int]]] | None = None,
        interval: float = DEFAULT_INTERVAL,
        history_size: int = DEFAULT_HISTORY,
        client_ttl: float = DEFAULT_CLIENT_TTL,
        trim: bool = False,
    ) -> None:
        self.interval = duration(interval, "interval")
        count(history_size, "history_size", minimum=1)
        self.history_size = history_size
        self.client_ttl = client_ttl
        self._figures = figures
        self._largest = largest
        self._process = psutil.Process(os.getpid())
        self._samples: collections.deque[Sample] = collections.deque(maxlen=history_size)
        self._clients: dict[int, _Client] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_rss = 0
        self._uss_ok = True
        self._next_uss = 0.0  # monotonic time of the next USS reading
        self._next_clients = 0.0  # monotonic time of the next reading of the clients' RSS
        self._pss_next = 0  # the client whose PSS is read next (round robin)
        self._last_clients: dict[str, list[str | int | bool | None]] | None = None
        self._changed = False  # a client registered, left or ended since the last reading
        self._trim = malloc_trimmer() if trim else None
        self._trim_mark = 0  # highest payload since the last trim
        self.trims = 0

    def register(self, pid: int, name: str = "", role: str = ROLE_WORKER,
                 leaving: bool = False) -> None:
        """Watch client process ``pid`` (named ``name``, in ``role``); its RSS is read at
        once.  ``leaving``: it is done with the store (it closed it, or it is exiting), so
        once it is gone it "exited"; a later registration takes that back."""
        if not isinstance(role, str) or not role:
            role = ROLE_WORKER
        with self._lock:
            client = self._clients.get(pid)
            if client is None or not client.alive:
                if leaving and client is None:
                    return  # a goodbye from a process never seen: nothing to show
                if client is None or not leaving:
                    client = self._clients[pid] = _Client(pid, name or f"pid-{pid}", role)
                    client.refresh(time.time())  # stats() right after connecting shows it
            elif name:
                client.name = name
            if client.alive:
                client.role = role
            client.leaving = bool(leaving)
            self._changed = True

    def _server_memory(self) -> tuple[int, int | None]:
        """RSS always; USS when its budget allows (None in the samples between)."""
        rss = self._process.memory_info().rss
        uss = None
        now = time.monotonic()
        if self._uss_ok and now >= self._next_uss:
            started = time.perf_counter()
            try:
                uss = getattr(self._process.memory_full_info(), "uss", None)
            except (psutil.AccessDenied, NotImplementedError, AttributeError):
                self._uss_ok = False
            # USS walks every page mapping (~12 ms per GiB of RSS): keep it to USS_BUDGET
            # of one CPU, so a big server's sampler cannot slow the store.
            self._next_uss = now + (time.perf_counter() - started) / USS_BUDGET
        return rss, uss

    def _clients_pss(self) -> None:
        """Read the PSS of the next clients, round robin, for at most `PSS_BUDGET` of
        this interval: 1000 clients are not read in one burst (which held the lock for
        seconds), and no reading is taken under the lock."""
        with self._lock:
            clients = list(self._clients.values())
        if not clients:
            return
        deadline = time.perf_counter() + PSS_BUDGET * self.interval
        start = self._pss_next % len(clients)
        done = 0
        while done < len(clients) and (done == 0 or time.perf_counter() < deadline):
            clients[(start + done) % len(clients)].refresh_pss()
            done += 1
        self._pss_next = start + done

    def sample(self) -> Sample:
        """Take one sample now, keep it, and return it."""
        now = time.time()
        rss, uss = self._server_memory()
        self._clients_pss()
        checkpoints, payload = self._figures()
        executions: list[list[str | int]] = [] if self._largest is None else \
            [[name, n, size] for name, n, size in self._largest()]
        if self._trim is not None:
            # Only payload on the heap: a freed segment's pages go back to the system
            # when its descriptor closes, and a trim (which holds the allocator's locks,
            # stalling every thread that allocates) would find nothing to give back.
            heap = payload - segment.held()[1]
            self._trim_mark = max(self._trim_mark, heap)
            if self._trim_mark - heap >= TRIM_STEP:
                self._trim()
                self.trims += 1
                self._trim_mark = heap
                rss, uss = self._server_memory()
        with self._lock:
            self.peak_rss = max(self.peak_rss, rss)
            tick = time.monotonic()
            clients = self._last_clients
            if tick >= self._next_clients or clients is None or self._changed:
                started = time.perf_counter()
                for pid, client in list(self._clients.items()):
                    client.refresh(now)
                    if not client.alive and now - client.last_seen > self.client_ttl:
                        del self._clients[pid]
                # Within CLIENT_BUDGET of one CPU: 1000 clients are read about every 1 s.
                if len(self._clients) > CLIENT_BUDGET_FROM:
                    self._next_clients = tick + (time.perf_counter() - started) / CLIENT_BUDGET
                clients = self._last_clients = {
                    str(c.pid): [c.name, c.rss, c.alive, c.pss, c.role, c.state]
                    for c in self._clients.values()}
                self._changed = False
            # (between readings, samples share the last readings' dict: nobody writes it)
            sample: Sample = {"t": now, "server_rss": rss, "server_uss": uss,
                              "checkpoints": checkpoints, "payload_bytes": payload,
                              "segment_bytes": segment.held()[1], "clients": clients,
                              "executions": executions}
            self._samples.append(sample)
        return sample

    def history(self, since: float | None = None) -> list[Sample]:
        """The kept samples, oldest first; only those taken after ``since`` (epoch s).

        An answer holds at most `HISTORY_ENTRIES` entries (a sample and each of its
        clients count one): with 1,000 clients, about 100 samples.  After ``since``, the
        oldest that fit (ask again with ``since`` = the last one's ``t`` for the rest);
        without it, the newest that fit.
        """
        with self._lock:
            kept = list(self._samples) if since is None else \
                [s for s in self._samples if s["t"] > since]
        budget = HISTORY_ENTRIES
        chosen: list[Sample] = []
        for sample in (kept if since is not None else reversed(kept)):
            budget -= 1 + len(sample["clients"])
            if budget < 0 and chosen:
                break
            chosen.append(sample)
        return chosen if since is not None else chosen[::-1]

    def clients(self) -> list[ClientInfo]:
        """Registered clients: pid, name, role, RSS and peak as of the last sample, and
        whether each still runs, checked now."""
        with self._lock:
            for c in self._clients.values():
                was = c.alive
                c.check_alive()
                self._changed |= c.alive != was
            return [c.to_dict() for c in self._clients.values()]

    def _run(self) -> None:
        failing = False  # warn once per run of failed samples, not once per sample
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception as exc:  # a sampler must never take the server down
                if not failing:
                    failing = True
                    hint = (" (out of file descriptors: raise `ulimit -n` or use fewer "
                            "connections)" if getattr(exc, "errno", None) == errno.EMFILE
                            else "")
                    log.warning("memory samples fail: %s: %s%s; the store goes on, samples "
                                "resume when reads succeed", type(exc).__name__, exc, hint,
                                exc_info=not isinstance(exc, OSError))
                continue
            failing = False

    def start(self) -> None:
        """Start the sampling thread (takes a first sample at once)."""
        if self._thread is None:
            self.sample()
            self._thread = threading.Thread(target=self._run, name="shmstore-monitor",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the sampling thread; the history stays readable."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
