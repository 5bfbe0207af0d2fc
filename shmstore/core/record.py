"""`Record`: one stored checkpoint as every backend keeps and exchanges it.

The header (ids, node, version, timestamp, parent) stays as values so that a table can
index, order and filter; metadata and state are the msgpack bytes the client encoded,
never decoded by a backend (a large state may be a sealed memory segment instead, see
`core.segment`).  A `Record` is a tuple (a `typing.NamedTuple`), so msgpack
packs it as the same 8-item array a plain tuple made: the wire and Redis are unchanged.
Whoever decodes one from the wire rebuilds it with `Record._make`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .segment import Segment

__all__ = ["Record"]


class Record(NamedTuple):
    """One checkpoint's stored form; clients send ``version`` 0, the backend assigns it."""

    id: str
    execution_id: str
    node_name: str
    version: int
    timestamp_us: int
    parent_id: str | None
    metadata: bytes
    #: The encoded state: bytes; or, through the data plane, a sealed memory `Segment`
    #: (held by the sender and by the server) or the read-only mapping of one (loaded).
    state: bytes | Segment | memoryview
