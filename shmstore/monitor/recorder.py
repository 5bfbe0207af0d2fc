"""`MemoryRecorder`: follows a store's memory samples, reading only the new ones.

The server samples itself and its registered clients (`shmstore.monitor.MemoryMonitor`);
the recorder only reads those samples, with `BaseStore.memory_history`, asking each time
for the samples taken after the last one it has (``since=last_t``).  So a slow reader
never loses a sample, as long as it comes back before the server's ring buffer has
turned over (``history_size`` samples: 10 minutes at the defaults).

Data only: nothing here prints or draws (`export` writes files, `view` shows them).

Example:
    >>> recorder = MemoryRecorder(store, keep=True)
    >>> recorder.poll(); time.sleep(5); recorder.poll()
    >>> recorder.server_growth()       # bytes/s over the last `window` samples
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..core.backend import ROLE_WORKER, TOOL_ROLES, Sample, client_state
from ..core.errors import ConfigError
from .growth import Growth, analyze

__all__ = ["DEFAULT_TREND", "DEFAULT_WINDOW", "ClientSample", "ExecutionSample", "MemoryHistory",
           "MemoryRecorder", "MemorySample"]

#: Growth rates are taken over this many of the newest samples.
DEFAULT_WINDOW = 10
#: Growth verdicts are judged over this many of the newest samples (60 s at the
#: server's default interval).
DEFAULT_TREND = 120
#: A client's first samples are its start-up (imports, first allocations): not judged.
WARMUP_SAMPLES = 4
#: Pages of history one `MemoryRecorder.poll` reads at most after its first answer.
MAX_PAGES = 50


class MemoryHistory(Protocol):
    """What the recorder reads: any store (`BaseStore.memory_history`), or a test double."""

    def memory_history(self, since: float | None = None) -> Sequence[Sample]: ...


@dataclasses.dataclass(frozen=True)
class ClientSample:
    """One registered client in one sample: pid, name, RSS (bytes), whether it lives,
    and its PSS (bytes; None in samples between readings, or from an older server)."""

    pid: int
    name: str
    rss: int
    alive: bool
    pss: int | None = None
    #: ``worker``, ``cli``, ``monitor`` or the client's own (`TOOL_ROLES` are the store's
    #: tools).
    role: str = ROLE_WORKER
    #: ``alive``, ``exited`` (it said goodbye) or ``gone`` (killed, crashed).
    state: str = ""

    @property
    def status(self) -> str:
        """``alive``, ``exited`` or ``gone`` (`client_state`)."""
        return client_state(self.alive, self.state)

    @property
    def tool(self) -> bool:
        """One of the store's own tools (``shmstore monitor``, ``stats``, ``doctor``)."""
        return self.role in TOOL_ROLES

    @property
    def measured(self) -> bool:
        """Alive with a real reading: a process on its way out can read 0 bytes of RSS."""
        return self.alive and self.rss > 0

    @property
    def label(self) -> str:
        """``pid/name``: the CSV's ``process`` column and the plot's legend."""
        return f"{self.pid}/{self.name}"


@dataclasses.dataclass(frozen=True)
class ExecutionSample:
    """One of the largest executions in one sample: its id, checkpoints and payload bytes."""

    name: str
    checkpoints: int
    payload_bytes: int


@dataclasses.dataclass(frozen=True)
class MemorySample:
    """One sample of the server: its memory, the store's figures, its clients.

    Attributes:
        t: when it was taken (epoch seconds, the server's clock).
        server_rss: the server's resident set size, bytes.
        server_uss: its unique set size, bytes (None where the platform has no USS).
        checkpoints: checkpoints stored.
        payload_bytes: encoded states' bytes stored.
        clients: registered clients, by pid.
        segment_bytes: the part of the payload held as sealed shared-memory segments
            (the data plane): outside the server's heap and RSS.
        executions: the largest executions then, largest first (at most 5; empty from
            an older server); `rest_bytes` is the payload of all the others.
    """

    t: float
    server_rss: int
    server_uss: int | None
    checkpoints: int
    payload_bytes: int
    clients: tuple[ClientSample, ...]
    segment_bytes: int = 0
    executions: tuple[ExecutionSample, ...] = ()

    @property
    def rest_bytes(self) -> int:
        """The payload of the executions not in `executions`."""
        return self.payload_bytes - sum(e.payload_bytes for e in self.executions)

    @property
    def heap_payload_bytes(self) -> int:
        """The payload in the server's heap (shared segments are outside its RSS)."""
        return self.payload_bytes - self.segment_bytes

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> MemorySample:
        """Build from one dict of `BaseStore.memory_history`."""
        clients = sorted(
            (ClientSample(int(pid), str(entry[0]), int(entry[1]), bool(entry[2]),
                          _optional_int(entry[3] if len(entry) > 3 else None),
                          str(entry[4]) if len(entry) > 4 else ROLE_WORKER,
                          str(entry[5]) if len(entry) > 5 else "")
             for pid, entry in raw.get("clients", {}).items()),
            key=lambda c: c.pid,
        )
        return cls(float(raw["t"]), int(raw["server_rss"]), _optional_int(raw.get("server_uss")),
                   int(raw["checkpoints"]), int(raw["payload_bytes"]), tuple(clients),
                   int(raw.get("segment_bytes", 0)),
                   tuple(ExecutionSample(str(e[0]), int(e[1]), int(e[2]))
                         for e in raw.get("executions", ())))


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _rate(points: Sequence[tuple[float, float]]) -> float | None:
    """Growth per second from the first to the last point, or None with under two."""
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    (t0, v0), (t1, v1) = points[0], points[-1]
    return (v1 - v0) / (t1 - t0)


class MemoryRecorder:
    """Follows a store's memory samples, reading only those it has not seen.

    Parameters:
        store: any store with ``memory_history`` (a `SharedStore` for a server).
        window: growth rates are taken over this many newest samples (>= 2).
        keep: keep every sample read, in `samples`, for `write_csv` and `write_plot`.
        backlog: with ``keep``, also keep the samples the server held before the first
            `poll` (else only the newest of them, the state at the start).
        trend: growth verdicts are judged over this many newest samples (>= 2)...
        trend_seconds: ...and, if given, only those of the newest this many seconds.

    Example:
        >>> recorder = MemoryRecorder(store, keep=True)
        >>> new = recorder.poll()          # every sample the server took since the last poll
        >>> recorder.server_growth()       # bytes/s over the last `window` samples
    """

    def __init__(self, store: MemoryHistory, *, window: int = DEFAULT_WINDOW,
                 keep: bool = False, backlog: bool = False, trend: int = DEFAULT_TREND,
                 trend_seconds: float | None = None) -> None:
        for name, value in (("window", window), ("trend", trend)):
            if type(value) is not int or value < 2:
                raise ConfigError(f"{name} must be an int >= 2, not {value!r}",
                                  value=repr(value))
        self._store = store
        self.window: collections.deque[MemorySample] = collections.deque(maxlen=window)
        #: The newest samples the growth verdicts are judged on.
        self.trend: collections.deque[MemorySample] = collections.deque(maxlen=trend)
        self.trend_seconds = trend_seconds
        #: Whether `visible` and `verdicts` include the store's own tools (``cli`` and
        #: ``monitor`` roles: `shmstore stats`, `monitor`, `doctor`).
        self.show_tools = False
        self._first_seen: dict[int, float] = {}  # client pid -> time of its first sample
        self._first_t: float | None = None  # the first sample read
        self.keep = keep
        self.backlog = backlog
        #: Every sample read (only with ``keep``), oldest first.
        self.samples: list[MemorySample] = []
        self.latest: MemorySample | None = None
        self.peak_server_rss = 0
        self.client_peaks: dict[int, int] = {}
        self.polls = 0
        self.read = 0
        self._last_t: float | None = None

    def poll(self) -> list[MemorySample]:
        """Read the samples taken since the last poll; return them, oldest first.

        Raises:
            StoreUnavailable: the server went away.
            StoreTimeout: the server did not answer in time.
        """
        new = [MemorySample.from_dict(r) for r in self._store.memory_history(since=self._last_t)]
        # An answer is bounded (`HISTORY_ENTRIES`): ask on from the newest until none is
        # left (a few pages at most; a caught-up poll costs one more empty answer).
        for _ in range(MAX_PAGES):
            if not new:
                break
            more = self._store.memory_history(since=new[-1].t)
            if not more:
                break
            new.extend(MemorySample.from_dict(r) for r in more)
        first = self.polls == 0
        self.polls += 1
        if not new:
            return new
        self.read += len(new)
        self._last_t = new[-1].t
        self.latest = new[-1]
        self.window.extend(new)
        self.trend.extend(new)
        if self.trend_seconds is not None:
            while self.trend and self.trend[0].t < new[-1].t - self.trend_seconds:
                self.trend.popleft()
        self._track_peaks(new)
        if self.keep:
            self.samples.extend(new if self.backlog or not first else new[-1:])
        return new

    def _track_peaks(self, new: Sequence[MemorySample]) -> None:
        """Raise the server's and each live client's peak RSS to what ``new`` shows."""
        if self._first_t is None and new:
            self._first_t = new[0].t
        for sample in new:
            self.peak_server_rss = max(self.peak_server_rss, sample.server_rss)
            for c in sample.clients:
                self._first_seen.setdefault(c.pid, sample.t)
                if c.alive:
                    self.client_peaks[c.pid] = max(self.client_peaks.get(c.pid, 0), c.rss)

    def latest_uss(self) -> int | None:
        """The newest USS reading in the window (a sampler may read USS less often)."""
        return next((s.server_uss for s in reversed(self.window) if s.server_uss is not None),
                    None)

    def server_growth(self) -> float | None:
        """The server's RSS growth in bytes/s over the window (None until two samples)."""
        return _rate([(s.t, s.server_rss) for s in self.window])

    def payload_growth(self) -> float | None:
        """Payload bytes added per second over the window."""
        return _rate([(s.t, s.payload_bytes) for s in self.window])

    def client_growth(self, pid: int) -> float | None:
        """A client's RSS growth in bytes/s over the window, while it was alive."""
        points = [(s.t, c.rss) for s in self.window for c in s.clients
                  if c.pid == pid and c.measured]
        return _rate(points)

    def server_verdict(self) -> Growth:
        """The server's growth over the trend window, net of what its heap payload
        explains (payload in shared segments is outside its RSS)."""
        samples = list(self.trend)
        return analyze([(s.t, s.server_rss) for s in samples],
                       explained_by=[(s.t, s.heap_payload_bytes) for s in samples])

    def client_verdict(self, pid: int) -> Growth:
        """A client's RSS growth over the trend window while it was alive; if it came
        while the recorder watched, its first `WARMUP_SAMPLES` samples (its start-up)
        are left out."""
        points = [(s.t, c.rss) for s in self.trend for c in s.clients
                  if c.pid == pid and c.measured]
        first = self._first_seen.get(pid)
        started_here = first is not None and self._first_t is not None and first > self._first_t
        if started_here and first is not None and points and points[0][0] <= first:
            points = points[WARMUP_SAMPLES:]
        return analyze(points)

    def execution_verdicts(self) -> list[tuple[ExecutionSample, Growth]]:
        """The newest sample's largest executions, each with the growth of its payload
        over the trend window (the samples where it was among the largest), the worst
        first: which execution makes the store grow."""
        if self.latest is None:
            return []
        judged = []
        for newest in self.latest.executions:
            points = [(s.t, e.payload_bytes) for s in self.trend for e in s.executions
                      if e.name == newest.name]
            judged.append((newest, analyze(points)))
        return sorted(judged, key=lambda eg: (-eg[1].rank, -eg[1].slope, eg[0].name))

    def visible(self, tools: bool | None = None) -> list[ClientSample]:
        """The newest sample's clients, the store's own tools left out unless ``tools``
        (default `show_tools`)."""
        if self.latest is None:
            return []
        keep_tools = self.show_tools if tools is None else tools
        return [c for c in self.latest.clients if keep_tools or not c.tool]

    def verdicts(self, tools: bool | None = None) -> list[tuple[ClientSample, Growth]]:
        """Every `visible` client of the newest sample with its verdict, the worst first
        (leaking, then growing, by growth per minute)."""
        judged = [(c, self.client_verdict(c.pid)) for c in self.visible(tools)]
        return sorted(judged, key=lambda cg: (-cg[1].rank, -cg[1].slope, cg[0].pid))
