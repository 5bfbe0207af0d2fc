"""`StoreStats`: what a store reports about itself, and how it reads to people.

The figures come from the backend as a plain dict (`StoreStats.from_dict`); this module
only holds them and formats them (`summary`, `str`, `format_bytes`), so the store's
calls and its reports stay apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .backend import ROLE_WORKER, TOOL_ROLES, client_state
from .errors import ConfigError

__all__ = ["RATIO_MIN_PAYLOAD", "StoreStats", "format_bytes", "overhead_ratio"]

#: RSS over payload is shown only from this much payload on: below it, RSS is mostly the
#: interpreter's own.
RATIO_MIN_PAYLOAD = 2**20


def overhead_ratio(rss: int, heap_payload: int) -> float | None:
    """A server's RSS per byte of the payload in its heap (None under
    `RATIO_MIN_PAYLOAD`, where RSS is mostly the interpreter's own)."""
    return rss / heap_payload if heap_payload >= RATIO_MIN_PAYLOAD else None


@dataclasses.dataclass(frozen=True)
class StoreStats:
    """What a store holds and how its server is doing.

    Attributes:
        checkpoints: number of checkpoints stored.
        executions: number of executions with at least one checkpoint.
        payload_bytes: exact sum of the encoded states' sizes.
        server_pid: pid of the process that owns the checkpoints.
        server_rss: resident set size of that process, in bytes (psutil).
        uptime_s: seconds since the store was created.
        ops: number of calls per operation.
        server_peak_rss: the highest RSS that process has had, in bytes.
        largest_executions: the largest executions by payload, as
            ``[execution_id, checkpoints, payload_bytes]``, largest first (at most 5).
        clients: registered client processes: dicts of ``pid``, ``name``, ``rss``, ``pss``,
            ``peak_rss`` and ``alive`` (empty for an in-process store).
        evictions: checkpoints dropped store-wide to make room (``on_full="evict"``).
        rejections: saves refused by a limit (`StoreFull`).
        pruned: checkpoints dropped by retention (``max_per_execution``).
        limits: the limits in force (`Limits.to_dict`).
        segments: sealed memory segments the server holds (the data plane): states
            that live in shared memory, outside its heap and its RSS.
        segment_bytes: their bytes (part of ``payload_bytes``).
        malloc_arenas: the server's cap on glibc malloc arenas (None: no cap, or not
            glibc; ``MALLOC_ARENA_MAX`` in its environment sets it).
    """

    checkpoints: int
    executions: int
    payload_bytes: int
    server_pid: int
    server_rss: int
    uptime_s: float
    ops: dict[str, int]
    server_peak_rss: int = 0
    largest_executions: list[list[Any]] = dataclasses.field(default_factory=list)
    clients: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    evictions: int = 0
    rejections: int = 0
    pruned: int = 0
    limits: dict[str, Any] = dataclasses.field(default_factory=dict)
    segments: int = 0
    segment_bytes: int = 0
    malloc_arenas: int | None = None

    @classmethod
    def from_dict(cls, figures: Mapping[str, Any]) -> StoreStats:
        """Build from the plain dict a table returns; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in figures.items() if k in names})

    @property
    def heap_payload_bytes(self) -> int:
        """The payload in the server's heap: ``payload_bytes`` less ``segment_bytes``
        (shared segments are outside its RSS)."""
        return self.payload_bytes - self.segment_bytes

    @property
    def overhead_ratio(self) -> float | None:
        """The server's RSS per byte of heap payload (`overhead_ratio`)."""
        return overhead_ratio(self.server_rss, self.heap_payload_bytes)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of the fields and the derived figures (JSON-ready)."""
        return {**dataclasses.asdict(self), "heap_payload_bytes": self.heap_payload_bytes,
                "overhead_ratio": self.overhead_ratio}

    @property
    def workers(self) -> list[dict[str, Any]]:
        """The clients that are not the store's own tools (``cli``/``monitor`` roles)."""
        return [c for c in self.clients if c.get("role", ROLE_WORKER) not in TOOL_ROLES]

    def summary(self) -> str:
        """One line: counts, payload, the server's memory and its clients (the store's
        own tools left out)."""
        shown = self.workers
        ended = sum(1 for c in shown if not c.get("alive"))
        clients = f", {len(shown)} clients" + (f" ({ended} ended)" if ended else "") \
            if shown else ""
        return (f"{self.checkpoints} checkpoints in {self.executions} executions, "
                f"{format_bytes(self.payload_bytes)} payload; server pid {self.server_pid}, "
                f"RSS {format_bytes(self.server_rss)} (peak "
                f"{format_bytes(self.server_peak_rss)}){clients}")

    def __str__(self) -> str:
        ratio = self.overhead_ratio
        lines = [
            f"{self.checkpoints} checkpoints in {self.executions} executions, "
            f"{format_bytes(self.payload_bytes)} payload",
            f"server pid {self.server_pid}: RSS {format_bytes(self.server_rss)} "
            f"(peak {format_bytes(self.server_peak_rss)}"
            + (f", {ratio:.2f}x its heap payload" if ratio else "")
            + f"), up {self.uptime_s:.1f} s",
        ]
        if self.malloc_arenas is not None:
            lines.append(f"malloc arenas: at most {self.malloc_arenas} (MALLOC_ARENA_MAX)")
        if self.segments:
            lines.append(f"shared memory: {format_bytes(self.segment_bytes)} in "
                         f"{self.segments} sealed segments (outside the server's RSS)")
        if self.largest_executions:
            lines.append("largest executions: " + ", ".join(
                f"{name} {format_bytes(nbytes)} in {count}"
                for name, count, nbytes in self.largest_executions))
        for client in self.workers:
            state = client_state(bool(client.get("alive")), client.get("state"))
            pss = client.get("pss")
            lines.append(f"client {client.get('pid')} {client.get('name', '')}: "
                         f"RSS {format_bytes(client.get('rss', 0))}"
                         + ("" if pss is None else f", PSS {format_bytes(pss)}")
                         + f" ({state})")
        in_force = {k: v for k, v in self.limits.items() if v is not None and k != "on_full"}
        if in_force:
            lines.append("limits: " + ", ".join(f"{k}={v}" for k, v in in_force.items())
                         + f", on_full={self.limits.get('on_full', 'reject')}")
        lines.append(f"evictions {self.evictions}, rejections {self.rejections}, "
                     f"pruned {self.pruned}")
        return "\n".join(lines)


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_bytes(text: str) -> int:
    """A byte count as people write it: ``1048576``, ``512MiB``, ``10 MiB``, ``2GB``.

    Raises:
        ConfigError: not a size, or under one byte.
    """
    spec = str(text).strip().lower()
    number = spec.rstrip("abcdefghijklmnopqrstuvwxyz")
    try:
        value = float(number) * _UNITS[spec[len(number):]]
    except (ValueError, KeyError):
        raise ConfigError(f"{text!r} is not a size: use bytes or a unit, e.g. 512MiB, 2GB",
                          value=repr(text)) from None
    if not value >= 1 or value == float("inf"):
        raise ConfigError(f"a size must be at least 1 byte, not {text!r}", value=repr(text))
    return int(value)


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``; bytes as people read them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
