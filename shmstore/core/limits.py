"""`Limits`: what a store may hold, and what happens when a save would not fit.

Every backend enforces the same limits the same way (the table for `MemoryStore` and the
shared server, Lua for Redis):

``max_checkpoint_bytes``
    one checkpoint's encoded state plus metadata; checked by the client before anything is
    sent (and again by the store).  Default 64 MiB; with the shared-memory data plane on
    (a `serve` on a unix socket, where large states travel as sealed memory and never
    pass through the server's heap) 4 GiB.  None: no limit.  The client's codec
    does not cap it with a bound of its own (unless made with ``max_bytes=``), and reads
    whatever the store holds.
``max_per_execution``
    retention: keep the newest N checkpoints of each execution; a save into a full
    execution drops its oldest in the same atomic step (the seed's ``MaxCheckpoints``,
    enforced).  Counted as ``pruned`` in stats.
``max_checkpoints`` / ``max_bytes``
    store-wide count and payload bytes (the encoded states, as ``stats().payload_bytes``).
    When a save would pass one: ``on_full="reject"`` raises `StoreFull` naming the limit
    and the figures, and nothing is written or touched; ``on_full="evict"`` drops the
    oldest checkpoints store-wide (in save order) until the new ones fit, counted as
    ``evictions``.  A save that could never fit (the batch alone is over the limit) is
    refused in both modes.
``max_rss``
    refuse saves while the server's resident memory is above this many bytes (evicting
    would not lower RSS at once, so this limit always rejects).

A `save_many` is checked whole: it fits entirely or nothing of it is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypedDict, cast

from .errors import ConfigError

__all__ = ["DEFAULT_MAX_CHECKPOINT_BYTES", "LIMIT_FIELDS", "Limits", "LimitsDict", "ON_FULL",
           "PLANE_MAX_CHECKPOINT_BYTES"]

DEFAULT_MAX_CHECKPOINT_BYTES = 64 * 1024 * 1024
#: The default with the data plane on: the states it exists for (GiB arrays) fit.
PLANE_MAX_CHECKPOINT_BYTES = 4 * 1024**3
ON_FULL = ("reject", "evict")

#: The limits that are counts (an int >= 1, or None for no limit); ``on_full`` is the rest.
LIMIT_FIELDS = ("max_bytes", "max_checkpoints", "max_per_execution", "max_checkpoint_bytes",
                "max_rss")


class LimitsDict(TypedDict):
    """`Limits.to_dict`: what a backend's ``limits`` answers (and ``stats`` carries)."""

    max_bytes: int | None
    max_checkpoints: int | None
    max_per_execution: int | None
    max_checkpoint_bytes: int | None
    max_rss: int | None
    on_full: str


@dataclasses.dataclass(frozen=True)
class Limits:
    """Limits a store enforces; ``None`` means no limit.

    Example:
        >>> Limits(max_per_execution=10, max_bytes=512 * 2**20, on_full="evict")
        Limits(max_bytes=536870912, max_checkpoints=None, max_per_execution=10, ...)
    """

    max_bytes: int | None = None
    max_checkpoints: int | None = None
    max_per_execution: int | None = None
    max_checkpoint_bytes: int | None = DEFAULT_MAX_CHECKPOINT_BYTES
    max_rss: int | None = None
    on_full: str = "reject"

    def __post_init__(self) -> None:
        for name in LIMIT_FIELDS:
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise ConfigError(
                    f"Limits.{name} must be an int >= 1 or None (no limit), not {value!r}",
                    option=name, value=repr(value)[:80],
                )
        if self.on_full not in ON_FULL:
            raise ConfigError(
                f"Limits.on_full must be 'reject' or 'evict', not {self.on_full!r}",
                option="on_full", value=repr(self.on_full)[:80],
            )

    def __repr__(self) -> str:
        return "Limits(" + ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)) + ")"

    @property
    def store_wide(self) -> bool:
        """Whether a store-wide limit (count or bytes) is set."""
        return self.max_bytes is not None or self.max_checkpoints is not None

    def to_dict(self) -> LimitsDict:
        """A plain dict of the fields (JSON- and msgpack-ready)."""
        return cast(LimitsDict, dataclasses.asdict(self))  # the fields are LimitsDict's

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> Limits:
        """Build from `to_dict` output; unknown keys are a `ConfigError`."""
        if not values:
            return cls()
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown limit(s) {unknown}; known: {sorted(names)}",
                              option=unknown[0], value=repr(unknown)[:80])
        return cls(**values)

    @classmethod
    def coerce(cls, value: Limits | dict[str, Any] | None, *,
               data_plane: bool = False) -> Limits:
        """Accept a `Limits`, a dict of its fields, or None (the defaults).

        With ``data_plane``, a ``max_checkpoint_bytes`` left unsaid defaults to
        `PLANE_MAX_CHECKPOINT_BYTES`.
        """
        if isinstance(value, Limits):
            return value
        if value is None or isinstance(value, dict):
            if data_plane and "max_checkpoint_bytes" not in (value or {}):
                value = {**(value or {}), "max_checkpoint_bytes": PLANE_MAX_CHECKPOINT_BYTES}
            return cls.from_dict(value)
        raise ConfigError(f"limits must be a Limits or a dict, not {type(value).__name__}",
                          option="limits", value=repr(value)[:80])
