"""``shmstore monitor``: the live view of a store's memory, and the command that runs it.

The renderers only: the samples come from a `MemoryRecorder` (`recorder`), the files
from `write_csv` and `write_plot` (`export`).  This is the one module of the package that
prints, for the command line (`run_monitor`): a rich ``Live`` table, or one plain line per
refresh, or (with ``--duration`` and a file to write) a silent recording.

Example (the API; the command line is ``shmstore monitor``):
    >>> run_monitor(store, duration=10, csv_path="memory.csv")
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import TYPE_CHECKING, TextIO

from ..core import validate
from ..core.errors import StoreTimeout, StoreUnavailable
from ..core.stats import format_bytes, overhead_ratio
from ..core.store import BaseStore
from .export import require_matplotlib, write_csv, write_plot
from .growth import Growth, format_per_minute
from .recorder import DEFAULT_WINDOW, MemoryRecorder, MemorySample

if TYPE_CHECKING:
    from rich.console import Group
    from rich.live import Live
    from rich.table import Table

__all__ = ["format_rate", "plain_line", "rich_view", "run_monitor"]

DEFAULT_REFRESH = 0.5
#: How the monitor names itself to the server (it is a client too).
MONITOR_NAME = "shmstore-monitor"
#: Exit codes of `run_monitor`.
EXIT_OK = 0
EXIT_SERVER_GONE = 1


def format_rate(rate: float | None) -> str:
    """Bytes per second with a sign, or a dash when there is no rate yet."""
    if rate is None:
        return "—"
    return ("+" if rate >= 0 else "") + format_bytes(rate) + "/s"


def _clock(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%H:%M:%S")


def _ratio(s: MemorySample) -> str:
    """RSS per byte of the payload in the server's heap (segments are outside RSS)."""
    ratio = overhead_ratio(s.server_rss, s.heap_payload_bytes)
    return "—" if ratio is None else f"{ratio:.2f}x"


def plain_line(recorder: MemoryRecorder) -> str:
    """One line about the newest sample (the view for logs, pipes and no rich)."""
    s = recorder.latest
    if s is None:
        return "no sample yet"
    shown = recorder.visible()
    alive = sum(c.alive for c in shown)
    clients = " ".join(f"{c.label}={format_bytes(c.rss)}"
                       + ("" if c.pss is None else f"(PSS {format_bytes(c.pss)})")
                       + ("" if c.alive else f"({c.status})")
                       + (f"[{_verdict(g)}]" if g.rank >= 2 else "")
                       for c, g in recorder.verdicts())
    shared = f", {format_bytes(s.segment_bytes)} shared" if s.segment_bytes else ""
    last_uss = recorder.latest_uss()
    uss = "" if last_uss is None else f" USS {format_bytes(last_uss)}"
    executions = "".join(
        f" {e.name}={format_bytes(e.payload_bytes)}" + (f"[{_grows(g)}]" if g.rank >= 2 else "")
        for e, g in recorder.execution_verdicts())
    executions = f" | largest executions:{executions}" if executions else ""
    return (f"{_clock(s.t)} server RSS {format_bytes(s.server_rss)} "
            f"(peak {format_bytes(recorder.peak_server_rss)}, "
            f"{format_rate(recorder.server_growth())}, {_verdict(recorder.server_verdict())})"
            f"{uss} | {s.checkpoints:,} checkpoints, "
            f"{format_bytes(s.payload_bytes)} payload{shared}, RSS/heap payload {_ratio(s)} | "
            f"clients {alive} alive, {len(shown) - alive} ended: {clients}{executions}")


def rich_view(recorder: MemoryRecorder, *, url: str, server_pid: int | None,
              refresh: float) -> Group:
    """The live view: a table of the server's figures and one of its clients (rich)."""
    from rich.console import Group
    from rich.text import Text

    s = recorder.latest
    head = Text.assemble(("" if s is None else _clock(s.t) + "  ", "cyan"),
                         ("shmstore monitor", "bold"), f"  server pid {server_pid} at {url}")
    if s is None:
        return Group(head, Text("waiting for the server's first sample …"))
    clients: Table | Text
    if recorder.visible():
        clients = _clients_table(recorder, s)
    elif s.clients:
        clients = Text("no clients but the store's own tools (--all shows them)", "dim")
    else:
        clients = Text("no registered clients", "dim")
    parts: list[Text | Table] = [head, Text(""), _server_table(recorder, s), Text(""),
                                 clients]
    if s.executions:
        parts += [Text(""), _executions_table(recorder, s)]
    return Group(*parts,
                 Text(f"\nrefresh every {refresh:g} s; {recorder.read} samples read; "
                      "Ctrl-C to stop", "dim"))


def _server_table(recorder: MemoryRecorder, s: MemorySample) -> Table:
    """The server's figures: now, peak and growth over the window."""
    from rich.table import Table

    server = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for column in ("server", "now", "peak", f"growth (last {len(recorder.window)})"):
        server.add_column(column, justify="left" if column == "server" else "right")
    server.add_row("RSS", format_bytes(s.server_rss), format_bytes(recorder.peak_server_rss),
                   format_rate(recorder.server_growth()))
    server.add_row("  verdict", _verdict(recorder.server_verdict()), "", "")
    uss = recorder.latest_uss()
    server.add_row("USS", "—" if uss is None else format_bytes(uss), "", "")
    server.add_row("payload", format_bytes(s.payload_bytes), "",
                   format_rate(recorder.payload_growth()))
    server.add_row("  in shared segments", format_bytes(s.segment_bytes), "", "")
    server.add_row("checkpoints", f"{s.checkpoints:,}", "", "")
    server.add_row("RSS / heap payload", _ratio(s), "", "")
    return server


def _clients_table(recorder: MemoryRecorder, s: MemorySample) -> Table:
    """One row per registered client: RSS, peak, growth, alive or dead."""
    from rich.table import Table
    from rich.text import Text

    clients = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    # Narrow: seven columns in 80 characters (the window is the server table's); a live
    # process's state is its growth verdict, an ended one's "exited" or "gone".
    for column, justify in (("pid", "right"), ("client", "left"), ("RSS", "right"),
                            ("PSS", "right"), ("peak", "right"), ("growth", "right"),
                            ("state", "left")):
        clients.add_column(column, justify=justify)  # type: ignore[arg-type]
    for c, g in recorder.verdicts():  # the worst first
        state = Text(g.verdict, _VERDICT_STYLE[g.verdict]) if c.alive \
            else Text(c.status, "bold red" if c.status == "gone" else "dim")
        clients.add_row(str(c.pid), c.name, format_bytes(c.rss),
                        "—" if c.pss is None else format_bytes(c.pss),
                        format_bytes(recorder.client_peaks.get(c.pid, c.rss)),
                        format_rate(recorder.client_growth(c.pid) if c.alive else None), state)
    return clients


def _executions_table(recorder: MemoryRecorder, s: MemorySample) -> Table:
    """The largest executions: checkpoints, payload and its growth, the worst first."""
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for column in ("execution", "checkpoints", "payload", "growth"):
        table.add_column(column, justify="left" if column == "execution" else "right")
    for e, g in recorder.execution_verdicts():
        table.add_row(e.name, f"{e.checkpoints:,}", format_bytes(e.payload_bytes),
                      Text(_grows(g), "yellow" if g.rank >= 2 else _VERDICT_STYLE[g.verdict]))
    table.add_row(Text("the rest", "dim"), "", format_bytes(s.rest_bytes), "")
    return table


_VERDICT_STYLE = {"leaking": "bold red", "growing": "yellow", "steady": "green",
                  "warming up": "dim"}


def _verdict(g: Growth) -> str:
    """A verdict with its rate where it matters: ``leaking +75.0 MiB/min``."""
    return f"{g.verdict} {format_per_minute(g.slope)}" if g.rank >= 2 else g.verdict


def _grows(g: Growth) -> str:
    """An execution's growth: its payload is what the store was given, so it "grows"
    (a process that grows so is "leaking"; an execution keeps what it is sent)."""
    return f"grows {format_per_minute(g.slope)}" if g.rank >= 2 else g.verdict


class _Display:
    """Where refreshes go: a rich Live table, plain lines, or nowhere (recording)."""

    def __init__(self, mode: str, out: TextIO, *, url: str, server_pid: int | None,
                 refresh: float) -> None:
        self.mode = mode
        self.out = out
        self._url, self._server_pid, self._refresh = url, server_pid, refresh
        self._live: Live | None = None
        if mode == "rich":
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(file=out), auto_refresh=False,
                              transient=False, redirect_stdout=False, redirect_stderr=False)
            self._live.start()

    def update(self, recorder: MemoryRecorder, fresh: bool) -> None:
        if self._live is not None:
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


def _say(err: TextIO, message: str) -> None:
    """A status line of the command, on ``err`` (the view owns ``out``)."""
    print(f"shmstore monitor: {message}", file=err, flush=True)


def run_monitor(
    store: BaseStore,
    *,
    refresh: float = DEFAULT_REFRESH,
    duration: float | None = None,
    csv_path: str | None = None,
    plot_path: str | None = None,
    window: int = DEFAULT_WINDOW,
    backlog: bool = False,
    plain: bool = False,
    show_tools: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Watch (or record) a store's memory until ``duration``, Ctrl-C, or the server goes.

    Shows a live view — a rich table, or with ``plain`` (or without rich) one line per
    new sample — refreshed every ``refresh`` seconds, unless ``duration`` is given with
    ``csv_path`` or ``plot_path``: then it records silently for ``duration`` seconds.
    Whatever was recorded is written to ``csv_path`` / ``plot_path`` at the end,
    also after Ctrl-C and after the server went away.  The store's own tools (clients in
    the ``cli`` and ``monitor`` roles, this one too) are left out of the view unless
    ``show_tools``; the CSV and the plot keep every process.

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
    recorder.show_tools = show_tools
    first = store.stats()  # fails here, before any view, when there is no server
    server_pid = getattr(first, "server_pid", None)
    url = str(getattr(store, "url", "in-process store"))
    recorder.peak_server_rss = int(getattr(first, "server_peak_rss", 0) or 0)
    if duration is not None and recording:
        mode = "none"
        _say(err, f"recording {duration:g} s of memory samples from {url} "
                  f"(server pid {server_pid})")
    else:
        mode = "rich" if not plain and _rich_available() else "plain"
    display = _Display(mode, out, url=url, server_pid=server_pid, refresh=refresh)
    gone = _watch(recorder, display, refresh, duration)
    title = (f"shmstore memory — server pid {server_pid} at {url}, "
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}")
    _write_files(recorder, csv_path, plot_path, title, err)
    if gone is not None:
        _say(err, f"the server at {url} went away or stopped answering "
                  f"({type(gone).__name__}: {gone}); {recorder.read} samples read")
        return EXIT_SERVER_GONE
    return EXIT_OK


def _watch(recorder: MemoryRecorder, display: _Display, refresh: float,
           duration: float | None) -> StoreUnavailable | StoreTimeout | None:
    """Poll and show every ``refresh`` s until ``duration``, Ctrl-C, or the server goes.

    Returns the error that ended it when the server went away or stopped answering.
    """
    deadline = None if duration is None else time.monotonic() + duration
    try:
        while True:
            fresh = recorder.poll()
            display.update(recorder, bool(fresh))
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            time.sleep(refresh if deadline is None else min(refresh, deadline - now))
    except KeyboardInterrupt:
        return None  # Ctrl-C is how a live view ends: not an error
    except (StoreUnavailable, StoreTimeout) as exc:
        return exc
    finally:
        display.stop()


def _write_files(recorder: MemoryRecorder, csv_path: str | None, plot_path: str | None,
                 title: str, err: TextIO) -> None:
    """Write what was recorded to the files asked for, saying so on ``err``."""
    if csv_path is not None:
        rows = write_csv(recorder.samples, csv_path)
        _say(err, f"wrote {csv_path} ({len(recorder.samples)} samples, {rows} rows)")
    if plot_path is None:
        return
    if recorder.samples:
        write_plot(recorder.samples, plot_path, title=title)
        _say(err, f"wrote {plot_path}")
    else:
        _say(err, f"no sample recorded, {plot_path} not written")
