"""`MemoryStore`: the contract in one process (the seed's store, done right)."""

from __future__ import annotations

from typing import Any, Final

from ..core.backend import ROLE_WORKER, Backend, Sample, closed_backend
from ..core.codec import MsgpackCodec
from ..core.errors import StoreUnavailable
from ..core.limits import Limits
from ..core.store import BaseStore
from ..monitor.sampler import MemoryMonitor
from .table import CheckpointTable

__all__ = ["MemoryStore"]


class LocalTable(CheckpointTable):
    """A table that is a whole `Backend`: it samples its own process's memory when asked
    (there is no server to sample in the background) and has no clients to register."""

    def __init__(self, limits: Limits | dict[str, Any] | None = None) -> None:
        super().__init__(limits)
        self._monitor = MemoryMonitor(self.figures, largest=self.largest)

    def memory_history(self, since: float | None = None) -> list[Sample]:
        """Take a sample now; then the samples after ``since``, oldest first."""
        self._monitor.sample()
        return self._monitor.history(since)

    def register_client(self, pid: int, name: str = "", role: str = ROLE_WORKER,
                        leaving: bool = False) -> None:
        """Nothing to do: every caller of an in-process store is this process."""


_LOCAL: Final[type[Backend]] = LocalTable  # mypy checks that it is a complete Backend


def _closed_error() -> StoreUnavailable:
    return StoreUnavailable("this MemoryStore was closed", address="memory://")


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
        # The table itself is the backend: a call is a method call, nothing in between.
        self._backend = LocalTable(limits)
        self._closed = False

    def close(self) -> None:
        """Drop every checkpoint; later calls raise `StoreUnavailable`; a ``wait`` or
        ``follow`` blocked in another thread returns (``follow`` ends) at once."""
        backend, self._backend = self._backend, closed_backend(_closed_error)
        self._closed = True
        if isinstance(backend, LocalTable):
            backend.end_waits()

    def _is_closed(self) -> bool:
        return self._closed
