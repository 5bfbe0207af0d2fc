"""`AsyncMemoryStore`: the in-process store's table behind the async contract.

The table's operations take microseconds and never touch the network, so they run in the
event loop itself; only the ones that block (a ``wait``, or a ``load_or_compute`` waiting
for another caller, with a time to wait) run on a worker thread, in slices of at most
`AsyncMemoryStore.wait_slice`, so the loop goes on meanwhile and a cancelled wait leaves
its thread for at most one slice.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..backends.memory import LocalTable, MemoryStore
from ..backends.shared import BLOCKING_OPS
from ..core.codec import MsgpackCodec
from ..core.errors import ConfigError, StoreUnavailable
from ..core.limits import Limits
from .store import AsyncStore, closed_async_backend

__all__ = ["AsyncMemoryStore"]


class _InLoop:
    """An `AsyncBackend` over a `LocalTable`: a call is a method call, or a worker
    thread's for a blocking one."""

    __slots__ = ("_table",)

    def __init__(self, table: LocalTable) -> None:
        self._table = table

    async def call(self, op: str, *args: Any) -> Any:
        slot = BLOCKING_OPS.get(op)
        if slot is not None and args[slot]:
            return await asyncio.to_thread(getattr(self._table, op), *args)
        return getattr(self._table, op)(*args)


def _closed() -> StoreUnavailable:
    return StoreUnavailable("this AsyncMemoryStore was closed", address="memory://")


class AsyncMemoryStore(AsyncStore):
    """A checkpoint store inside this process, as coroutines (`MemoryStore`'s contract).

    Parameters:
        store: share this `MemoryStore`'s checkpoints (sync and async code of one process
            then see the same store); default a new one.
        codec, limits: as for `MemoryStore` (only without ``store``).

    Raises:
        ConfigError: ``store`` is given with ``limits``, or is not a `MemoryStore`.

    Example:
        >>> async with AsyncMemoryStore() as store:
        ...     (await store.save(Checkpoint(execution_id="run", state=1))).version
        1
    """

    #: A blocking wait's slice: how long a cancelled wait's worker thread may linger.
    wait_slice = 1.0

    def __init__(self, store: MemoryStore | None = None, *, codec: MsgpackCodec | None = None,
                 limits: Limits | dict[str, Any] | None = None) -> None:
        self._own_table = store is None  # (a shared table's waits are its owner's too)
        if store is None:
            store = MemoryStore(codec=codec, limits=limits)
        elif not isinstance(store, MemoryStore) or limits is not None:
            raise ConfigError("AsyncMemoryStore takes a MemoryStore (its limits are its "
                              f"own), not {type(store).__name__} with limits={limits!r}",
                              value=repr(store)[:80])
        super().__init__(codec=codec if codec is not None else store.codec)
        table = store._backend
        if not isinstance(table, LocalTable):
            raise ConfigError("that MemoryStore is closed", value=repr(store)[:80])
        self._backend = _InLoop(table)
        self._table = table

    async def aclose(self) -> None:
        """Later calls raise `StoreUnavailable` (a shared `MemoryStore` stays open); a
        blocked `wait`/`follow` of its own table ends at once (on a shared table, at the
        end of its slice, `wait_slice`)."""
        self._backend = closed_async_backend(_closed)
        self._ended = True
        if self._own_table:
            self._table.end_waits()

    def _is_closed(self) -> bool:
        return getattr(self, "_ended", False)
