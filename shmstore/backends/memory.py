"""`MemoryStore`: the contract in one process (the seed's store, done right)."""

from __future__ import annotations

from typing import Any

from ..core.codec import MsgpackCodec
from ..core.errors import StoreUnavailable
from ..core.limits import Limits
from ..core.store import BaseStore
from ..monitor.sampler import MemoryMonitor
from .table import TABLE_OPS, CheckpointTable

__all__ = ["MemoryStore"]


class MemoryStore(BaseStore):
    """A thread-safe checkpoint store inside this process.

    States are encoded on save, so what is stored is a snapshot: mutating a state after
    saving it, or a loaded one, never changes history.  Versions are assigned per
    execution, so "latest" is well defined (the seed's is random).

    Parameters:
        codec: encodes states and metadata (default: msgpack with extension types).
        limits: what the store may hold (`Limits`, or a dict of its fields).

    ``memory_history()`` samples this process when called (there is no server to sample
    in the background).

    Example:
        >>> from shmstore import Checkpoint, MemoryStore
        >>> with MemoryStore() as store:
        ...     store.save(Checkpoint(execution_id="run", state=[1, 2])).version
        1
    """

    def __init__(self, *, codec: MsgpackCodec | None = None,
                 limits: Limits | dict[str, Any] | None = None) -> None:
        super().__init__(codec=codec)
        table = CheckpointTable(limits)
        self._table: CheckpointTable | None = table
        self._ops: dict[str, Any] = {op: getattr(table, op) for op in TABLE_OPS}
        monitor = MemoryMonitor(table.figures)

        def memory_history(since: float | None) -> list[dict[str, Any]]:
            monitor.sample()
            return monitor.history(since)

        self._ops["memory_history"] = memory_history

    def _call(self, op: str, *args: Any) -> Any:
        if self._table is None:
            raise StoreUnavailable("this MemoryStore was closed", address="memory://")
        return self._ops[op](*args)

    def close(self) -> None:
        """Drop every checkpoint; later calls raise `StoreUnavailable`."""
        self._table = None
        self._ops = {}
