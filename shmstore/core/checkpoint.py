"""`Checkpoint`, the record every store keeps, and its id generation.

Ids are time-ordered UUIDv7 strings (RFC 9562): ids made by one process sort in the order
they were made, and ids made by different processes sort by the millisecond they were
made in.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from .errors import ConfigError

__all__ = ["Checkpoint", "new_id", "validate_id"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_US = timedelta(microseconds=1)
MAX_ID_LENGTH = 1024

_id_lock = threading.Lock()
_getrandbits = random.getrandbits
_last_ms = 0
_counter = 0


def new_id() -> str:
    """Return a new UUIDv7 string; ids from one process strictly increase.

    Within one millisecond a 12-bit counter (randomly seeded each millisecond) keeps the
    order; if it runs out, the timestamp is advanced by one millisecond, as RFC 9562
    allows, so order is never lost.  The random bits come from `random` (reseeded after
    fork): ids must be unique, not secret.

    Example:
        >>> a, b = new_id(), new_id()
        >>> a < b
        True
    """
    global _last_ms, _counter
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = _getrandbits(11)  # top bit left as headroom
        else:
            _counter += 1
            if _counter > 0xFFF:
                _last_ms += 1
                _counter = 0
        ms, counter = _last_ms, _counter
    h = "%032x" % (
        (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | _getrandbits(62)
    )
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def validate_id(value: object, what: str = "checkpoint id") -> str:
    """Return ``value`` if it is a usable id (a non-empty str), else raise `ConfigError`."""
    if type(value) is not str:
        raise ConfigError(
            f"{what} must be a str, not {type(value).__name__}: {value!r:.80}", value=repr(value)
        )
    if not value:
        raise ConfigError(f"{what} must not be empty", value="")
    if len(value) > MAX_ID_LENGTH:
        raise ConfigError(
            f"{what} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}",
            value=value[:80],
        )
    return value


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One saved state of one execution.

    Parameters:
        execution_id: the run this checkpoint belongs to (required, non-empty).
        node_name: the step that produced it.
        state: the user's state; anything the codec can encode.
        metadata: a small dict kept beside the state.
        timestamp: when it was made (timezone-aware UTC; naive values are taken as UTC).
        version: 0 until saved; the store assigns the execution's next version.
        parent_id: the checkpoint this one follows, if any.
        id: a new time-ordered UUIDv7 string unless given.

    Raises:
        ConfigError: on an empty or non-str id or execution id, or a bad field type.

    Example:
        >>> cp = Checkpoint(execution_id="run-1", node_name="fetch", state={"n": 1})
        >>> cp.version
        0
    """

    execution_id: str
    node_name: str = ""
    state: Any = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    timestamp: datetime = dataclasses.field(default_factory=_utcnow)
    version: int = 0
    parent_id: str | None = None
    id: str = dataclasses.field(default_factory=new_id)

    def __post_init__(self) -> None:
        validate_id(self.id)
        validate_id(self.execution_id, "execution_id")
        if type(self.node_name) is not str:
            raise ConfigError(
                f"node_name must be a str, not {type(self.node_name).__name__}",
                value=repr(self.node_name),
            )
        if self.parent_id is not None:
            validate_id(self.parent_id, "parent_id")
        if not isinstance(self.metadata, dict):
            raise ConfigError(
                f"metadata must be a dict, not {type(self.metadata).__name__}",
                value=repr(self.metadata)[:80],
            )
        if type(self.version) is not int or self.version < 0:
            raise ConfigError(f"version must be an int >= 0, not {self.version!r}",
                              value=repr(self.version))
        if not isinstance(self.timestamp, datetime):
            raise ConfigError(
                f"timestamp must be a datetime, not {type(self.timestamp).__name__}",
                value=repr(self.timestamp)[:80],
            )
        if self.timestamp.tzinfo is None:
            object.__setattr__(self, "timestamp", self.timestamp.replace(tzinfo=timezone.utc))
        elif self.timestamp.tzinfo is not timezone.utc:
            object.__setattr__(self, "timestamp", self.timestamp.astimezone(timezone.utc))


def timestamp_to_us(ts: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime (exact, unlike a float)."""
    return (ts - _EPOCH) // _ONE_US


def us_to_timestamp(us: int) -> datetime:
    """The aware UTC datetime of ``us`` microseconds since the Unix epoch."""
    return _EPOCH + timedelta(microseconds=us)
