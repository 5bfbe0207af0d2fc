"""``shmstore doctor``: who grows, by how much, whether the store explains it, what to try.

Reads the server's memory history once (`MemoryRecorder` with its backlog: the server has
been sampling all along, so a diagnosis needs no waiting), judges the server and every
registered client with `growth.analyze`, and says it in plain words, the worst first.

Data and words only: `diagnose` builds a `Diagnosis`, `format_diagnosis` writes it;
the command line prints it (``shmstore doctor``, ``--json`` for machines).

Example:
    >>> print(format_diagnosis(diagnose(MemoryRecorder(store, backlog=True, keep=False))))
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..core.stats import format_bytes, overhead_ratio
from .growth import Growth, format_per_minute
from .recorder import ClientSample, ExecutionSample, MemoryRecorder

__all__ = ["Diagnosis", "Finding", "diagnose", "format_diagnosis"]

#: Processes that are the store's own tools, never judged as workers.
TOOL_NAMES = frozenset({"shmstore-monitor", "shmstore-doctor"})
#: A server whose RSS is more than this many times its heap payload is worth a word.
HIGH_OVERHEAD = 1.5


@dataclasses.dataclass(frozen=True)
class Finding:
    """One process judged: who (``server`` or ``pid/name``), its verdict and figures."""

    who: str
    pid: int
    growth: Growth
    rss: int
    alive: bool
    advice: str
    status: str = "alive"

    def to_dict(self) -> dict[str, Any]:
        g = self.growth
        return {"who": self.who, "pid": self.pid, "verdict": g.verdict, "rss": self.rss,
                "alive": self.alive, "state": self.status, "bytes_per_min": g.per_minute,
                "low_per_min": g.low * 60, "high_per_min": g.high * 60,
                "explained_per_min": g.explained * 60, "window_s": g.span,
                "samples": g.samples, "advice": self.advice}


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """The server's finding, the clients' (worst first) and the figures they rest on."""

    server: Finding | None
    clients: tuple[Finding, ...]
    payload_bytes: int
    heap_payload_bytes: int
    segment_bytes: int
    span: float
    #: The largest executions with the growth of their payload, the worst first.
    executions: tuple[tuple[ExecutionSample, Growth], ...] = ()

    @property
    def leaking(self) -> tuple[Finding, ...]:
        every = ([self.server] if self.server else []) + list(self.clients)
        return tuple(f for f in every if f.growth.verdict == "leaking")

    def to_dict(self) -> dict[str, Any]:
        return {"server": None if self.server is None else self.server.to_dict(),
                "clients": [c.to_dict() for c in self.clients],
                "payload_bytes": self.payload_bytes,
                "heap_payload_bytes": self.heap_payload_bytes,
                "segment_bytes": self.segment_bytes, "window_s": self.span,
                "leaking": [f.who for f in self.leaking],
                "executions": [{"execution": e.name, "checkpoints": e.checkpoints,
                                "payload_bytes": e.payload_bytes, "verdict": g.verdict,
                                "bytes_per_min": g.per_minute} for e, g in self.executions]}


def _server_advice(g: Growth, rss: int, heap_payload: int) -> str:
    ratio = overhead_ratio(rss, heap_payload)
    if g.verdict == "leaking":
        return ("its RSS grows beyond what its payload explains: check `shmstore stats` for "
                "connections and executions nobody clears, and report it if they do not "
                "account for it")
    if g.verdict == "growing":
        return ("it grew beyond its payload earlier in the window and has stopped: the "
                "allocator keeping freed memory for reuse, not a leak")
    if ratio is not None and ratio > HIGH_OVERHEAD:
        return (f"RSS is {ratio:.2f}x its heap payload: allocator slack from freed states "
                "(it trims after large frees); clear executions you no longer need")
    if g.explained > g.floor:
        return "its growth is its payload's: the store keeps what it is given"
    return ""


def _client_advice(g: Growth) -> str:
    if g.verdict == "leaking":
        return ("the store does not explain a client's own memory: that process keeps what "
                "it makes (states or results held in a list, a cache, a global); "
                "tracemalloc or memray in it will show where")
    if g.verdict == "growing":
        return "it grew, then stopped: a warm-up or a cache that filled, not a leak"
    return ""


def diagnose(recorder: MemoryRecorder, *, exclude_pids: frozenset[int] = frozenset()
             ) -> Diagnosis:
    """Judge the server and every client of the recorder's newest sample (polling it
    first); the store's own tools and ``exclude_pids`` are left out."""
    recorder.poll()
    latest = recorder.latest
    if latest is None:
        return Diagnosis(None, (), 0, 0, 0, 0.0)
    heap = latest.heap_payload_bytes
    sg = recorder.server_verdict()
    server = Finding("server", 0, sg, latest.server_rss, True,
                     _server_advice(sg, latest.server_rss, heap))

    def judged(c: ClientSample) -> bool:  # (names: servers from before roles)
        return not c.tool and c.name not in TOOL_NAMES and c.pid not in exclude_pids

    clients = tuple(Finding(c.label, c.pid, g, c.rss, c.alive, _client_advice(g), c.status)
                    for c, g in recorder.verdicts(tools=True) if judged(c))
    return Diagnosis(server, clients, latest.payload_bytes, heap, latest.segment_bytes,
                     sg.span, tuple(recorder.execution_verdicts()))


def _line(f: Finding) -> str:
    g = f.growth
    head = f"{g.verdict.upper() if g.rank >= 2 else g.verdict:<10} {f.who}: RSS " \
           f"{format_bytes(f.rss)}"
    if not f.alive:
        head += f" ({f.status})"
    if g.verdict == "warming up":
        return f"{head}, {g.samples} samples so far: too few to judge"
    body = f", {format_per_minute(g.slope)} over {g.span:.0f} s"
    if g.rank >= 2:
        body += (f" (95%: {format_per_minute(g.low)} to {format_per_minute(g.high)}; "
                 f"recent half {format_per_minute(g.recent)})")
    if f.who == "server" and g.explained:
        body += f" beyond its payload's {format_per_minute(g.explained)}"
    return head + body


def format_diagnosis(d: Diagnosis) -> str:
    """The diagnosis in plain words, the worst first, with what to try."""
    if d.server is None:
        return "no memory sample yet: the server samples every monitor interval (0.5 s)"
    lines = [f"{d.span:.0f} s of samples; payload {format_bytes(d.payload_bytes)} "
             f"({format_bytes(d.heap_payload_bytes)} on the server's heap, "
             f"{format_bytes(d.segment_bytes)} in shared segments)", ""]
    for f in sorted([d.server, *d.clients], key=lambda f: -f.growth.rank):
        lines.append(_line(f))
        if f.advice:
            lines.append(f"           {f.advice}")
    growing = [(e, g) for e, g in d.executions if g.rank >= 2]
    if growing:
        lines.append("")
        lines.append("the payload grows in:")
        for e, g in growing:
            lines.append(f"  {e.name}: {format_bytes(e.payload_bytes)} in "
                         f"{e.checkpoints:,} checkpoints, {format_per_minute(g.slope)}")
        lines.append("           the store keeps every checkpoint it is given: drop old ones "
                     "(`purge(execution, keep=N)`, `clear`) or set the "
                     "`max_per_execution` limit")
    leaking = d.leaking
    lines.append("")
    lines.append("leaking: " + ", ".join(f.who for f in leaking) if leaking
                 else "no process is leaking")
    return "\n".join(lines)
