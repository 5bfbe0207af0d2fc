"""Files from what a `MemoryRecorder` recorded: a CSV table and a PNG plot.

matplotlib is imported only when a plot is drawn (it is the ``[cli]`` extra), and only
its Agg canvas: no pyplot, no display, the process's own backend untouched.

Example:
    >>> write_csv(recorder.samples, "memory.csv"); write_plot(recorder.samples, "memory.png")
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from ..core.errors import ConfigError
from .growth import analyze, format_per_minute
from .recorder import DEFAULT_TREND, MemorySample

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["CSV_COLUMNS", "PLOT_EXTRA", "SERVER", "require_matplotlib", "write_csv",
           "write_plot"]

#: Columns of the CSV file: one row per process per sample.
CSV_COLUMNS = ("t", "process", "rss", "uss", "alive", "payload_bytes", "checkpoints", "pss",
               "segment_bytes")
#: The ``process`` column of the server's rows, and its name in the plot's legend (a
#: client's is ``pid/name``).
SERVER = "server"
#: The extra that brings matplotlib (for ``--plot``).
PLOT_EXTRA = "shmstore[cli]"
MiB = 1024 * 1024
#: Fewer samples than this get a marker on each point (a line alone would hide them).
_MARK_BELOW = 12
#: The store panel draws the payload of at most this many executions (and the rest).
PLOT_EXECUTIONS = 5
#: This many clients or more get a two-column legend.
_TWO_LEGEND_COLUMNS = 10


def write_csv(samples: Iterable[MemorySample], path: str) -> int:
    """Write samples to ``path`` as CSV, one row per process per sample; return the rows.

    Columns (`CSV_COLUMNS`): ``t`` (epoch seconds), ``process`` (``server``, or
    ``pid/name`` for a client), ``rss`` (bytes), ``uss`` (bytes, server rows only, empty
    where the platform has none), ``alive`` (1 or 0), the store's ``payload_bytes``
    and ``checkpoints`` at that sample (repeated on each of its rows, so that every row
    stands alone), ``pss`` (bytes, client rows, empty between readings: shared pages
    divided among the processes that map them) and ``segment_bytes`` (server rows: the
    payload held as shared-memory segments, outside the server's RSS).
    """
    rows = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for s in samples:
            t = f"{s.t:.3f}"
            uss = "" if s.server_uss is None else s.server_uss
            writer.writerow((t, SERVER, s.server_rss, uss, 1, s.payload_bytes, s.checkpoints,
                             "", s.segment_bytes))
            rows += 1
            for c in s.clients:
                writer.writerow((t, c.label, c.rss, "", int(c.alive), s.payload_bytes,
                                 s.checkpoints, "" if c.pss is None else c.pss, ""))
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

    Left: the server's RSS (and USS, dashed) and each client's RSS (and PSS, dashed), in
    MiB, against seconds since the first sample; a client that is gone (killed, crashed)
    ends with an ``x``, one that exited with a dot, and one leaking over its newest
    samples is a thick line with ``leaking +X MiB/min`` in the legend.
    Right: the payload bytes stored (MiB), that of each of the largest executions
    (``+X MiB/min`` beside one that grows) and of the others, the part in shared-memory
    segments (outside the server's RSS), and on a second axis the checkpoint count.

    Raises:
        ConfigError: matplotlib is not installed, or there is no sample to draw.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not samples:
        raise ConfigError("no memory sample to plot: monitor for longer than the server's "
                          "sampling interval", value=path)
    plot = _Plot(samples)
    fig = Figure(figsize=(12, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    mem, pay = fig.subplots(1, 2, width_ratios=[2, 1])
    plot.memory(mem)
    plot.store(pay)
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png")


class _Plot:
    """The samples on a shared x axis (seconds since the first), drawn panel by panel."""

    def __init__(self, samples: Sequence[MemorySample]) -> None:
        self.samples = samples
        self.xs = [s.t - samples[0].t for s in samples]
        self.marker = "o" if len(samples) < _MARK_BELOW else None

    def memory(self, ax: Axes) -> None:
        """The left panel: the server's RSS and USS, and each client's RSS."""
        self._server(ax)
        labels = self._client_labels()
        for pid, label in sorted(labels.items()):
            self._client(ax, pid, label)
        ax.set_xlabel("seconds")
        ax.set_ylabel("RSS, MiB")
        ax.set_title("memory per process")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncols=1 if len(labels) < _TWO_LEGEND_COLUMNS else 2,
                  loc="best")

    def store(self, ax: Axes) -> None:
        """The right panel: payload bytes and, on a second axis, the checkpoint count."""
        ax.plot(self.xs, [s.payload_bytes / MiB for s in self.samples], color="tab:green",
                lw=2, marker=self.marker, label="payload")
        self._executions(ax)
        if any(s.segment_bytes for s in self.samples):
            ax.plot(self.xs, [s.segment_bytes / MiB for s in self.samples], color="tab:olive",
                    lw=1.4, ls="--", label="in shared segments")
        ax.set_xlabel("seconds")
        ax.set_ylabel("payload, MiB", color="tab:green")
        ax.set_ylim(bottom=0)
        ax.set_title("store")
        ax.grid(alpha=0.3)
        count = ax.twinx()
        count.plot(self.xs, [s.checkpoints for s in self.samples], color="tab:gray", lw=1,
                   ls=":", label="checkpoints")
        count.set_ylabel("checkpoints", color="tab:gray")
        count.set_ylim(bottom=0)
        handles = ax.get_legend_handles_labels()[0] + count.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize="small", loc="lower right")

    def _executions(self, ax: Axes) -> None:
        """The payload of the largest executions (those largest at their own peak, at
        most `PLOT_EXECUTIONS`; a gap where one was not among a sample's largest), and
        of all the others; one growing fastest is named so in the legend."""
        peaks: dict[str, int] = {}
        for s in self.samples:
            for e in s.executions:
                peaks[e.name] = max(peaks.get(e.name, 0), e.payload_bytes)
        if not peaks:
            return  # an older server, or Redis before any checkpoint
        names = sorted(peaks, key=lambda n: (-peaks[n], n))[:PLOT_EXECUTIONS]
        for name in names:
            ys = [next((e.payload_bytes / MiB for e in s.executions if e.name == name),
                       math.nan) for s in self.samples]
            points = [(x, y * MiB) for x, y in zip(self.xs, ys, strict=True) if y == y]
            verdict = analyze(points[-DEFAULT_TREND:])
            note = f" ({format_per_minute(verdict.slope)})" if verdict.rank >= 2 else ""
            ax.plot(self.xs, ys, lw=1.0, marker=self.marker, label=f"{name}{note}")
        ax.plot(self.xs, [s.rest_bytes / MiB for s in self.samples], lw=1.0, ls="-.",
                color="tab:gray", label="other executions")

    def _server(self, ax: Axes) -> None:
        line = ax.plot(self.xs, [s.server_rss / MiB for s in self.samples], lw=2.2,
                       marker=self.marker, label=f"{SERVER} RSS")[0]
        uss = [(x, s.server_uss) for x, s in zip(self.xs, self.samples, strict=True)
               if s.server_uss is not None]
        if uss:  # a sampler may read USS less often than RSS, or never
            ax.plot([x for x, _ in uss], [u / MiB for _, u in uss], lw=1.4, ls="--",
                    color=line.get_color(), label=f"{SERVER} USS")

    def _client_labels(self) -> dict[int, str]:
        """Every client seen in any sample, by pid (its newest label)."""
        return {c.pid: c.label for s in self.samples for c in s.clients}

    def label(self, pid: int, label: str) -> str:
        """A client's legend entry: ``pid/name``, how it ended, and ``leaking +X/min``
        when its newest samples say so (`growth.analyze`)."""
        xs, ys, ended = self._client_track(pid)
        verdict = analyze([(x, y * MiB) for x, y in zip(xs, ys, strict=True)][-DEFAULT_TREND:])
        notes = [ended] if ended else []
        if verdict.verdict == "leaking":
            notes.append(f"leaking {format_per_minute(verdict.slope)}")
        return label + (f" ({', '.join(notes)})" if notes else "")

    def _client(self, ax: Axes, pid: int, label: str) -> None:
        """One client's RSS while it was measured: a thick line if it leaks, an ``x``
        at its last reading if it is gone (killed, crashed), a dot if it exited."""
        xs, ys, ended = self._client_track(pid)
        if not xs:
            return  # never measured: nothing to draw, and no legend entry
        text = self.label(pid, label)
        line = ax.plot(xs, ys, marker=self.marker, label=text,
                       lw=3.0 if "leaking" in text else 1.2)[0]
        pss = [(x, c.pss) for x, s in zip(self.xs, self.samples, strict=True)
               for c in s.clients if c.pid == pid and c.measured and c.pss is not None]
        if pss:
            ax.plot([x for x, _ in pss], [p / MiB for _, p in pss], lw=1.0, ls="--",
                    color=line.get_color())
        if ended:
            ax.plot([xs[-1]], [ys[-1]], marker="x" if ended == "gone" else "o", ms=9, mew=2,
                    color=line.get_color())

    def _client_track(self, pid: int) -> tuple[list[float], list[float], str | None]:
        """The client's measured (x, RSS MiB) points, and how it ended (``exited`` or
        ``gone``; None while it runs)."""
        xs: list[float] = []
        ys: list[float] = []
        ended: str | None = None
        for x, s in zip(self.xs, self.samples, strict=True):
            for c in s.clients:
                if c.pid == pid and c.measured:
                    xs.append(x)
                    ys.append(c.rss / MiB)
                    ended = None
                elif c.pid == pid and not c.alive:
                    ended = c.status
        return xs, ys, ended
