"""``shmstore monitor``: a live view, a CSV file and a PNG plot of a store's memory.

The server samples itself and its registered clients (`shmstore.monitor.MemoryMonitor`);
this module only reads those samples, with `BaseStore.memory_history`, asking each time
for the samples taken after the last one it has (``since=last_t``).  So a slow refresh
never loses a sample, as long as it comes back before the server's ring buffer has
turned over (``history_size`` samples: 10 minutes at the defaults).

- `MemoryRecorder` follows a store's samples: the newest, a window for growth rates,
  peaks, and (when asked) every sample for a file.
- `write_csv` and `write_plot` write what it recorded.
- `run_monitor` is the command: a rich ``Live`` table (or one plain line per refresh),
  or a silent recording for ``--duration`` seconds.

Example (the API; the command line is ``shmstore monitor``):
    >>> recorder = MemoryRecorder(store, keep=True)
    >>> recorder.poll(); time.sleep(5); recorder.poll()
    >>> write_csv(recorder.samples, "memory.csv"); write_plot(recorder.samples, "memory.png")
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import datetime
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from ..core import validate
from ..core.errors import ConfigError, StoreTimeout, StoreUnavailable
from ..core.stats import RATIO_MIN_PAYLOAD, format_bytes

__all__ = [
    "CSV_COLUMNS",
    "ClientSample",
    "MemoryRecorder",
    "MemorySample",
    "format_bytes",
    "require_matplotlib",
    "run_monitor",
    "write_csv",
    "write_plot",
]

#: Columns of the CSV file: one row per process per sample.
CSV_COLUMNS = ("t", "process", "rss", "uss", "alive", "payload_bytes", "checkpoints")
#: The ``process`` column of the server's rows (a client's is ``pid/name``).
SERVER = "server"
DEFAULT_REFRESH = 0.5
#: Growth rates are taken over this many of the newest samples.
DEFAULT_WINDOW = 10
#: The extra that brings matplotlib (for ``--plot``).
PLOT_EXTRA = "shmstore[cli]"
#: How the monitor names itself to the server (it is a client too).
MONITOR_NAME = "shmstore-monitor"
#: Exit codes of `run_monitor`.
EXIT_OK = 0
EXIT_SERVER_GONE = 1
MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ClientSample:
    """One registered client in one sample: pid, name, RSS (bytes) and whether it lives."""

    pid: int
    name: str
    rss: int
    alive: bool

    @property
    def measured(self) -> bool:
        """Alive with a real reading: a process on its way out can read 0 bytes of RSS."""
        return self.alive and self.rss > 0

    @property
    def label(self) -> str:
        """``pid/name``: the CSV's ``process`` column and the plot's legend."""
        return f"{self.pid}/{self.name}"


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
    """

    t: float
    server_rss: int
    server_uss: int | None
    checkpoints: int
    payload_bytes: int
    clients: tuple[ClientSample, ...]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MemorySample:
        """Build from one dict of `BaseStore.memory_history`."""
        clients = sorted(
            (ClientSample(int(pid), str(entry[0]), int(entry[1]), bool(entry[2]))
             for pid, entry in raw.get("clients", {}).items()),
            key=lambda c: c.pid,
        )
        uss = raw.get("server_uss")
        return cls(float(raw["t"]), int(raw["server_rss"]), None if uss is None else int(uss),
                   int(raw["checkpoints"]), int(raw["payload_bytes"]), tuple(clients))


def format_rate(rate: float | None) -> str:
    """Bytes per second with a sign, or a dash when there is no rate yet."""
    if rate is None:
        return "—"
    return ("+" if rate >= 0 else "") + format_bytes(rate) + "/s"


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

    Example:
        >>> recorder = MemoryRecorder(store, keep=True)
        >>> new = recorder.poll()          # every sample the server took since the last poll
        >>> recorder.server_growth()       # bytes/s over the last `window` samples
    """

    def __init__(self, store: Any, *, window: int = DEFAULT_WINDOW, keep: bool = False,
                 backlog: bool = False) -> None:
        if type(window) is not int or window < 2:
            raise ConfigError(f"window must be an int >= 2, not {window!r}", value=repr(window))
        self._store = store
        self.window: collections.deque[MemorySample] = collections.deque(maxlen=window)
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
        raw = self._store.memory_history(since=self._last_t)
        new = [MemorySample.from_dict(r) for r in raw]
        first = self.polls == 0
        self.polls += 1
        if not new:
            return new
        self.read += len(new)
        self._last_t = new[-1].t
        self.latest = new[-1]
        self.window.extend(new)
        for sample in new:
            self.peak_server_rss = max(self.peak_server_rss, sample.server_rss)
            for c in sample.clients:
                if c.alive:
                    self.client_peaks[c.pid] = max(self.client_peaks.get(c.pid, 0), c.rss)
        if self.keep:
            self.samples.extend(new if self.backlog or not first else new[-1:])
        return new

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


# ------------------------------------------------------------------------------- files


def write_csv(samples: Iterable[MemorySample], path: str) -> int:
    """Write samples to ``path`` as CSV, one row per process per sample; return the rows.

    Columns (`CSV_COLUMNS`): ``t`` (epoch seconds), ``process`` (``server``, or
    ``pid/name`` for a client), ``rss`` (bytes), ``uss`` (bytes, server rows only, empty
    where the platform has none), ``alive`` (1 or 0), and the store's ``payload_bytes``
    and ``checkpoints`` at that sample (repeated on each of its rows, so that every row
    stands alone).
    """
    rows = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for s in samples:
            t = f"{s.t:.3f}"
            uss = "" if s.server_uss is None else s.server_uss
            writer.writerow((t, SERVER, s.server_rss, uss, 1, s.payload_bytes, s.checkpoints))
            rows += 1
            for c in s.clients:
                writer.writerow((t, c.label, c.rss, "", int(c.alive), s.payload_bytes,
                                 s.checkpoints))
                rows += 1
    return rows


def require_matplotlib() -> None:
    """Raise `ConfigError` naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"plotting needs matplotlib, which is not installed: pip install "
            f"'{PLOT_EXTRA}' (or pip install matplotlib)",
            value="matplotlib",
        ) from None


def write_plot(samples: Sequence[MemorySample], path: str, *, title: str | None = None) -> None:
    """Draw memory over time to a PNG: one line per process, payload bytes beside it.

    Left: the server's RSS (and USS, dashed) and each client's RSS, in MiB, against
    seconds since the first sample; a client that died ends with an ``x``.  Right: the
    payload bytes stored (MiB) and, on a second axis, the checkpoint count.

    Uses matplotlib's Agg canvas directly (no pyplot, no display, the process's own
    backend untouched).

    Raises:
        ConfigError: matplotlib is not installed, or there is no sample to draw.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not samples:
        raise ConfigError("no memory sample to plot: monitor for longer than the server's "
                          "sampling interval", value=path)
    t0 = samples[0].t
    xs = [s.t - t0 for s in samples]
    marker = "o" if len(samples) < 12 else None
    fig = Figure(figsize=(12, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    mem, pay = fig.subplots(1, 2, width_ratios=[2, 1])

    line = mem.plot(xs, [s.server_rss / MiB for s in samples], lw=2.2, marker=marker,
                    label=f"{SERVER} RSS")[0]
    if any(s.server_uss is not None for s in samples):
        mem.plot([x for x, s in zip(xs, samples, strict=True) if s.server_uss is not None],
                 [s.server_uss / MiB for s in samples if s.server_uss is not None],
                 lw=1.4, ls="--", color=line.get_color(), label=f"{SERVER} USS")
    labels: dict[int, str] = {}
    for s in samples:
        for c in s.clients:
            labels[c.pid] = c.label
    for pid, label in sorted(labels.items()):
        alive_x, alive_y, dead_at = [], [], None
        for x, s in zip(xs, samples, strict=True):
            for c in s.clients:
                if c.pid != pid:
                    continue
                if c.measured:
                    alive_x.append(x)
                    alive_y.append(c.rss / MiB)
                elif dead_at is None:
                    dead_at = x
        if not alive_x:
            continue
        line = mem.plot(alive_x, alive_y, lw=1.2, marker=marker,
                        label=label + (" (died)" if dead_at is not None else ""))[0]
        if dead_at is not None:
            mem.plot([alive_x[-1]], [alive_y[-1]], marker="x", ms=9, mew=2,
                     color=line.get_color())
    mem.set_xlabel("seconds")
    mem.set_ylabel("RSS, MiB")
    mem.set_title("memory per process")
    mem.set_ylim(bottom=0)
    mem.grid(alpha=0.3)
    mem.legend(fontsize="small", ncols=1 if len(labels) < 10 else 2, loc="best")

    pay.plot(xs, [s.payload_bytes / MiB for s in samples], color="tab:green", lw=2,
             marker=marker, label="payload")
    pay.set_xlabel("seconds")
    pay.set_ylabel("payload, MiB", color="tab:green")
    pay.set_ylim(bottom=0)
    pay.set_title("store")
    pay.grid(alpha=0.3)
    count = pay.twinx()
    count.plot(xs, [s.checkpoints for s in samples], color="tab:gray", lw=1, ls=":",
               label="checkpoints")
    count.set_ylabel("checkpoints", color="tab:gray")
    count.set_ylim(bottom=0)
    handles = pay.get_legend_handles_labels()[0] + count.get_legend_handles_labels()[0]
    pay.legend(handles=handles, fontsize="small", loc="lower right")
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png")


# -------------------------------------------------------------------------------- views


def _clock(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%H:%M:%S")


def _ratio(s: MemorySample) -> str:
    if s.payload_bytes < RATIO_MIN_PAYLOAD:
        return "—"
    return f"{s.server_rss / s.payload_bytes:.2f}x"


def plain_line(recorder: MemoryRecorder) -> str:
    """One line about the newest sample (the view for logs, pipes and no rich)."""
    s = recorder.latest
    if s is None:
        return "no sample yet"
    alive = sum(c.alive for c in s.clients)
    clients = " ".join(f"{c.label}={format_bytes(c.rss)}" + ("" if c.alive else "(dead)")
                       for c in s.clients)
    last_uss = recorder.latest_uss()
    uss = "" if last_uss is None else f" USS {format_bytes(last_uss)}"
    return (f"{_clock(s.t)} server RSS {format_bytes(s.server_rss)} "
            f"(peak {format_bytes(recorder.peak_server_rss)}, "
            f"{format_rate(recorder.server_growth())}){uss} | {s.checkpoints:,} checkpoints, "
            f"{format_bytes(s.payload_bytes)} payload, RSS/payload {_ratio(s)} | "
            f"clients {alive} alive, {len(s.clients) - alive} dead: {clients}")


def rich_view(recorder: MemoryRecorder, *, url: str, server_pid: int | None,
              refresh: float) -> Any:
    """The live view: a table of the server's figures and one of its clients (rich)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    s = recorder.latest
    head = Text.assemble(("" if s is None else _clock(s.t) + "  ", "cyan"),
                         ("shmstore monitor", "bold"), f"  server pid {server_pid} at {url}")
    if s is None:
        return Group(head, Text("waiting for the server's first sample …"))
    n = len(recorder.window)
    server = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for column in ("server", "now", "peak", f"growth (last {n})"):
        server.add_column(column, justify="left" if column == "server" else "right")
    server.add_row("RSS", format_bytes(s.server_rss), format_bytes(recorder.peak_server_rss),
                   format_rate(recorder.server_growth()))
    uss = recorder.latest_uss()
    server.add_row("USS", "—" if uss is None else format_bytes(uss), "", "")
    server.add_row("payload", format_bytes(s.payload_bytes), "",
                   format_rate(recorder.payload_growth()))
    server.add_row("checkpoints", f"{s.checkpoints:,}", "", "")
    server.add_row("RSS / payload", _ratio(s), "", "")

    clients = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for column, justify in (("pid", "right"), ("client", "left"), ("RSS", "right"),
                            ("peak", "right"), (f"growth (last {n})", "right"),
                            ("state", "left")):
        clients.add_column(column, justify=justify)  # type: ignore[arg-type]
    for c in s.clients:
        state = Text("alive", "green") if c.alive else Text("dead", "bold red")
        clients.add_row(str(c.pid), c.name, format_bytes(c.rss),
                        format_bytes(recorder.client_peaks.get(c.pid, c.rss)),
                        format_rate(recorder.client_growth(c.pid) if c.alive else None), state)
    body: list[Any] = [head, Text(""), server, Text("")]
    body.append(clients if s.clients else Text("no registered clients", "dim"))
    body.append(Text(f"\nrefresh every {refresh:g} s; {recorder.read} samples read; "
                     "Ctrl-C to stop", "dim"))
    return Group(*body)


class _Display:
    """Where refreshes go: a rich Live table, plain lines, or nowhere (recording)."""

    def __init__(self, mode: str, out: TextIO, *, url: str, server_pid: int | None,
                 refresh: float) -> None:
        self.mode = mode
        self.out = out
        self._url, self._server_pid, self._refresh = url, server_pid, refresh
        self._live: Any = None
        if mode == "rich":
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(file=out), auto_refresh=False,
                              transient=False, redirect_stdout=False, redirect_stderr=False)
            self._live.start()

    def update(self, recorder: MemoryRecorder, fresh: bool) -> None:
        if self.mode == "rich":
            self._live.update(rich_view(recorder, url=self._url, server_pid=self._server_pid,
                                         refresh=self._refresh), refresh=True)
        elif self.mode == "plain" and fresh:
            print(plain_line(recorder), file=self.out, flush=True)

    def stop(self) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()


def _rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def run_monitor(
    store: Any,
    *,
    refresh: float = DEFAULT_REFRESH,
    duration: float | None = None,
    csv_path: str | None = None,
    plot_path: str | None = None,
    window: int = DEFAULT_WINDOW,
    backlog: bool = False,
    plain: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Watch (or record) a store's memory until ``duration``, Ctrl-C, or the server goes.

    Shows a live view — a rich table, or with ``plain`` (or without rich) one line per
    new sample — refreshed every ``refresh`` seconds, unless ``duration`` is given with
    ``csv_path`` or ``plot_path``: then it records silently for ``duration`` seconds.
    Whatever was recorded is written to ``csv_path`` / ``plot_path`` at the end,
    also after Ctrl-C and after the server went away.

    Returns:
        0 when the duration ran out or on Ctrl-C; 1 when the server went away or stopped
        answering (a message on ``err`` says so).

    Raises:
        ConfigError: a bad option, or ``plot_path`` without matplotlib (checked first).
        StoreUnavailable, AccessDenied: no server to begin with.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    refresh = validate.duration(refresh, "refresh")
    duration = validate.optional_duration(duration, "duration", zero=False)
    if plot_path is not None:
        require_matplotlib()
    recording = csv_path is not None or plot_path is not None
    recorder = MemoryRecorder(store, window=window, keep=recording, backlog=backlog)
    first = store.stats()  # fails here, before any view, when there is no server
    server_pid = getattr(first, "server_pid", None)
    url = str(getattr(store, "url", "in-process store"))
    recorder.peak_server_rss = int(getattr(first, "server_peak_rss", 0) or 0)
    if duration is not None and recording:
        mode = "none"
        print(f"shmstore monitor: recording {duration:g} s of memory samples from {url} "
              f"(server pid {server_pid})", file=err, flush=True)
    else:
        mode = "rich" if not plain and _rich_available() else "plain"
    display = _Display(mode, out, url=url, server_pid=server_pid, refresh=refresh)
    gone: BaseException | None = None
    started = time.monotonic()
    deadline = None if duration is None else started + duration
    try:
        while True:
            fresh = recorder.poll()
            display.update(recorder, bool(fresh))
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            pause = refresh if deadline is None else min(refresh, deadline - now)
            time.sleep(pause)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a live view ends: not an error
    except (StoreUnavailable, StoreTimeout) as exc:
        gone = exc
    finally:
        display.stop()
    title = (f"shmstore memory — server pid {server_pid} at {url}, "
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}")
    if csv_path is not None:
        rows = write_csv(recorder.samples, csv_path)
        print(f"shmstore monitor: wrote {csv_path} ({len(recorder.samples)} samples, "
              f"{rows} rows)", file=err, flush=True)
    if plot_path is not None:
        if recorder.samples:
            write_plot(recorder.samples, plot_path, title=title)
            print(f"shmstore monitor: wrote {plot_path}", file=err, flush=True)
        else:
            print(f"shmstore monitor: no sample recorded, {plot_path} not written", file=err,
                  flush=True)
    if gone is not None:
        print(f"shmstore monitor: the server at {url} went away or stopped answering "
              f"({type(gone).__name__}: {gone}); {recorder.read} samples read",
              file=err, flush=True)
        return EXIT_SERVER_GONE
    return EXIT_OK
