"""`AsyncStore`: the checkpoint-store contract as coroutines.

An async store is `core.store.StoreLogic` (every argument check, Checkpoint ↔ `Record`,
what each answer means: the same code `BaseStore` runs) plus an `AsyncBackend`, whose one
coroutine ``call(op, *args)`` runs a table operation somewhere: in the server process
over the wire (`aio.shared.AsyncSharedStore`), in this process (`aio.memory`), or in Redis
(`aio.redis`).  So a method here is the sync one's shape with ``await`` where it calls its
backend, and nothing else.
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import inspect
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, NoReturn, Protocol

from ..core.backend import ClaimAnswer, CompleteAnswer, Sample
from ..core.checkpoint import Checkpoint, validate_id
from ..core.errors import ShmstoreError
from ..core.limits import Limits
from ..core.record import Record
from ..core.segment import Segment
from ..core.stats import StoreStats
from ..core.store import (
    DEFAULT_LEASE_S,
    StoreLogic,
    _check_limit,
    _check_timeout,
    _release,
    _with_version,
    check_record,
    renewed,
)
from ..core.stream import Cleared, FollowCursor, ListAbove

__all__ = ["AsyncBackend", "AsyncStore", "closed_async_backend"]

log = logging.getLogger("shmstore")

# Who computes, while a `load_or_compute` runs its compute(): a call from inside it (the
# same task, or a worker thread it runs in, which copies the context) is the same owner.
_COMPUTING: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "shmstore_computing", default=None)


def _owner() -> str:
    """Who computes: host, process and task (a re-entrant call is recognised by it)."""
    return _COMPUTING.get() or (
        f"{socket.gethostname()}:{os.getpid()}:task-{id(asyncio.current_task())}")


class AsyncBackend(Protocol):
    """Where an `AsyncStore`'s table operations run: one coroutine for every op of
    `core.backend.BACKEND_OPS`, with the op's positional arguments and answer."""

    async def call(self, op: str, *args: Any) -> Any: ...


class _Closed:
    """An async backend whose every call raises (what a closed store calls)."""

    __slots__ = ("_error",)

    def __init__(self, error: Callable[[], Exception]) -> None:
        self._error = error

    async def call(self, op: str, *args: Any) -> NoReturn:
        raise self._error()


def closed_async_backend(error: Callable[[], Exception]) -> AsyncBackend:
    """An `AsyncBackend` whose every call raises ``error()``."""
    return _Closed(error)


class AsyncStore(StoreLogic):
    """The checkpoint-store contract as coroutines; subclasses supply ``_backend``, an
    `AsyncBackend`.  Every method means what `BaseStore`'s of the same name means, raises
    the same errors and checks its arguments before anything is sent; use it from one
    event loop (the one it was opened in), from any number of tasks at once.

    Example:
        >>> async with await shmstore.aio.connect(url) as store:
        ...     saved = await store.save(Checkpoint(execution_id="run", state={"n": 1}))
    """

    _backend: AsyncBackend

    def _call(self, op: str, *args: Any) -> Awaitable[Any]:
        # The backend's coroutine itself, not one awaiting it: a frame less per call.
        return self._backend.call(op, *args)

    async def _record(self, cp: Checkpoint) -> Record:
        encoded = self._encoded(cp)
        if self._must_ask_limit(encoded):
            self._max_checkpoint_bytes = (await self.limits()).max_checkpoint_bytes
        return self._sealed(encoded)

    async def limits(self) -> Limits:
        """The `Limits` the store enforces (`BaseStore.limits`)."""
        return Limits.from_dict(await self._call("limits"))

    # -- the contract -------------------------------------------------------------------

    async def save(self, checkpoint: Checkpoint, *,
                   expected_version: int | None = None) -> Checkpoint:
        """Store an immutable snapshot; return it with its version (`BaseStore.save`).

        Raises:
            EncodeError, VersionConflict, StoreFull: as `BaseStore.save`.
        """
        _check_limit(expected_version, "expected_version")
        record = await self._record(checkpoint)
        try:
            version = await self._call("save", record, expected_version)
        finally:
            if type(record[7]) is Segment:
                record[7].close()
        return _with_version(checkpoint, version)

    async def save_many(self, checkpoints: Iterable[Checkpoint]) -> builtins.list[Checkpoint]:
        """Store several checkpoints in one round trip; all or nothing (`BaseStore.save_many`)."""
        cps, versions = await self._save_all("save_many", checkpoints)
        return [_with_version(cp, v) for cp, v in zip(cps, versions, strict=True)]

    async def save_new(self, checkpoints: Iterable[Checkpoint],
                       ) -> builtins.list[Checkpoint | None]:
        """Store each checkpoint whose id is not stored yet (`BaseStore.save_new`)."""
        cps, versions = await self._save_all("save_new", checkpoints)
        return [_with_version(cp, v) if v else None for cp, v in zip(cps, versions, strict=True)]

    async def _save_all(self, op: str, checkpoints: Iterable[Checkpoint],
                        ) -> tuple[builtins.list[Checkpoint], builtins.list[int]]:
        """Encode every checkpoint first (nothing is sent if one fails), then run ``op``."""
        cps = list(checkpoints)
        records: builtins.list[Record] = []
        try:
            for cp in cps:
                records.append(await self._record(cp))
            return cps, (await self._call(op, records) if records else [])
        finally:
            _release(records)

    async def load(self, checkpoint_id: str, *, copy: bool | None = None) -> Checkpoint:
        """The checkpoint with this id (`BaseStore.load`).

        Raises:
            CheckpointNotFound: there is none.
        """
        return self._decoded(await self._call("load", validate_id(checkpoint_id)), copy)

    async def load_many(self, checkpoint_ids: Iterable[str], *,
                        copy: bool | None = None) -> builtins.list[Checkpoint]:
        """The checkpoints with these ids, in order, in one round trip (`BaseStore.load_many`)."""
        ids = self._load_many_args(checkpoint_ids)
        return self._decode_all(await self._call("load_many", ids), copy) if ids else []

    async def list(self, execution_id: str, *, limit: int | None = None,
                   before_version: int | None = None, after_version: int | None = None,
                   newest_first: bool = False) -> builtins.list[Checkpoint]:
        """The checkpoints of one execution, ordered by version; strictly between
        ``after_version`` and ``before_version`` when given (`BaseStore.list`)."""
        args = self._list_args(execution_id, limit, before_version, newest_first,
                               after_version)
        # without after_version, the request has the shape older servers know
        return self._decode_all(await self._call("list", *(args if args[4] is not None
                                                          else args[:4])))

    async def list_records(self, execution_id: str, *, limit: int | None = None,
                           before_version: int | None = None,
                           newest_first: bool = False) -> builtins.list[Record]:
        """The records of one execution as the store keeps them (`BaseStore.list_records`)."""
        args = self._list_args(execution_id, limit, before_version, newest_first)
        return self._as_stored(await self._call("list", *args[:4]))

    async def save_records(self, records: Iterable[Record]) -> builtins.list[int]:
        """Store records as another store kept them, in one round trip; all or nothing
        (`BaseStore.save_records`)."""
        threshold = self._plane_threshold
        sent: builtins.list[Record] = []
        try:
            for record in records:
                checked = check_record(record)
                if self._asks_limit(len(checked.state) + len(checked.metadata)):
                    self._max_checkpoint_bytes = (await self.limits()).max_checkpoint_bytes
                sent.append(self._to_save(checked, threshold))
            return builtins.list(await self._call("save_many", sent)) if sent else []
        finally:
            _release(sent)

    def follow(self, execution_id: str, *, after_version: int = 0,
               timeout: float | None = None) -> AsyncIterator[Checkpoint | Cleared]:
        """Every checkpoint of the execution, in version order, as it is saved: an async
        iterator (``async for``), `BaseStore.follow`'s twin (the same `FollowCursor`).

        It waits in the store between checkpoints without blocking the event loop, yields
        a `Cleared` marker when the execution was emptied, and ends when ``timeout``
        seconds pass without a new item or the store is closed; to stop it sooner, cancel
        its task (the connection of a call cut off so is discarded).

        Raises:
            ConfigError: a bad execution id, ``after_version`` or ``timeout`` (when called).
        """
        cursor = FollowCursor(execution_id, after_version=after_version)
        return self._follow(cursor, _check_timeout(timeout))

    async def _follow(self, cursor: FollowCursor,
                      total: float | None) -> AsyncIterator[Checkpoint | Cleared]:
        """Run ``cursor``'s requests with awaited calls; yield what it returns."""
        loop = asyncio.get_running_loop()
        execution_id = cursor.execution_id
        deadline = None if total is None else loop.time() + total
        while not self._is_closed():
            request = cursor.request()
            ran_out = False
            try:
                if isinstance(request, ListAbove):
                    items = cursor.on_list(await self._call(
                        "list", execution_id, request.limit, None, False,
                        request.after_version))
                else:
                    chunk = 0.0
                    if request.block:
                        left = self.wait_slice if deadline is None else deadline - loop.time()
                        chunk = max(0.0, min(left, self.wait_slice))
                    record, generation = await self._call(
                        "wait", execution_id, request.after_version, chunk, request.generation)
                    items = cursor.on_wait(record, generation)
                    ran_out = request.block and record is None
            except ShmstoreError:
                if self._is_closed():  # closed under us (another task): the end
                    return
                raise
            for item in items:
                yield item if isinstance(item, Cleared) else self._decoded(item)
            if items and total is not None:
                deadline = loop.time() + total
            elif ran_out and deadline is not None and loop.time() >= deadline:
                return

    def _is_closed(self) -> bool:
        """True once `aclose` was called (a follower ends then; each store says)."""
        return False

    async def latest(self, execution_id: str) -> Checkpoint | None:
        """The execution's checkpoint with the highest version, or None."""
        return self._decode(await self._call("latest", validate_id(execution_id,
                                                                   "execution_id")))

    async def delete(self, checkpoint_id: str) -> bool:
        """Drop one checkpoint; False when there was none."""
        return bool(await self._call("delete", validate_id(checkpoint_id)))

    async def clear(self, execution_id: str) -> int:
        """Drop every checkpoint of one execution; return how many were dropped."""
        return int(await self._call("clear", validate_id(execution_id, "execution_id")))

    async def executions(self) -> builtins.list[str]:
        """Ids of the executions that have checkpoints, sorted."""
        return builtins.list(await self._call("executions"))

    async def wait(self, execution_id: str, *, after_version: int = 0,
                   timeout: float | None = None) -> Checkpoint:
        """Wait, without blocking the event loop, until the execution has a version above
        ``after_version``; return the latest (`BaseStore.wait`).

        Raises:
            StoreTimeout: ``timeout`` seconds passed first.
        """
        execution_id, after, deadline = self._wait_args(execution_id, after_version, timeout,
                                                        self.wait_slice)
        generation = 0
        while True:
            record, generation = await self._call("wait", execution_id, after,
                                                  deadline.chunk(), generation)
            if record is not None:
                return self._decoded(record)
            if deadline.passed():
                raise self._wait_timed_out(execution_id, after, deadline)

    async def load_or_compute(
        self,
        execution_id: str,
        node_name: str,
        compute: Callable[[], Any] | Callable[[], Awaitable[Any]],
        *,
        timeout: float | None = None,
        lease: float = DEFAULT_LEASE_S,
    ) -> Checkpoint:
        """The node's latest checkpoint, computed by exactly one caller if there is none
        (`BaseStore.load_or_compute`).

        ``compute`` may be a coroutine function (awaited in this task) or a plain callable
        (run in a worker thread, so the loop goes on); a task renews the lease meanwhile.

        Raises:
            StoreTimeout, EncodeError, ConfigError: as `BaseStore.load_or_compute`.
            Exception: whatever ``compute()`` raised, in the caller that ran it.
        """
        lease_s, deadline = self._claim_args(execution_id, node_name, compute, timeout,
                                             lease, self.wait_slice)
        owner = _owner()
        while True:
            answer: ClaimAnswer = await self._call("claim", execution_id, node_name, owner,
                                                   lease_s, deadline.chunk())
            got = self._claimed(answer, execution_id, node_name, deadline)
            if isinstance(got, str):
                return await self._compute(execution_id, node_name, compute, got, lease_s,
                                           owner)
            if got is not None:
                return got

    async def _compute(self, execution_id: str, node_name: str,
                       compute: Callable[[], Any], token: str, lease_s: float,
                       owner: str) -> Checkpoint:
        key = (execution_id, node_name)
        mark = _COMPUTING.set(owner)
        try:
            heartbeat = asyncio.ensure_future(self._heartbeat(key, token, lease_s))
            try:
                if inspect.iscoroutinefunction(compute):
                    state = await compute()
                else:
                    state = await asyncio.to_thread(compute)
                    if inspect.isawaitable(state):
                        state = await state
            finally:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
            record = await self._record(Checkpoint(execution_id=execution_id,
                                                   node_name=node_name, state=state))
            answer: CompleteAnswer = await self._call("complete", record, token)
        except BaseException:
            try:
                await self._call("release", *key, token)
            except ShmstoreError as exc:
                log.debug("cannot release the lease on %s: %s", key, exc)
            raise
        finally:
            _COMPUTING.reset(mark)
        return self._completed(answer, record)

    async def _heartbeat(self, key: tuple[str, str], token: str, lease_s: float) -> None:
        while True:
            await asyncio.sleep(lease_s / 3)
            try:
                held: bool | ShmstoreError = await self._call("renew", *key, token, lease_s)
            except ShmstoreError as exc:
                held = exc
            if not renewed(key, held):
                return

    # -- queries over several executions --------------------------------------------------

    async def find(
        self,
        execution_id: str | Iterable[str],
        *,
        prefix: bool = False,
        node_name: str | None = None,
        where: Mapping[str, Any] | None = None,
        before_id: str | None = None,
        limit: int | None = None,
        checkpoint_id: str | None = None,
        children: str | None = None,
        by_id: bool = False,
    ) -> builtins.list[tuple[Checkpoint, builtins.list[Checkpoint]]]:
        """Checkpoints of one or several executions that match, with their children
        (`BaseStore.find`)."""
        args = self._find_args(execution_id, prefix, node_name, where, before_id, limit,
                               checkpoint_id, children, by_id)
        return [] if args is None else self._found(await self._call("find", *args))

    async def purge(
        self,
        execution_id: str | Iterable[str],
        *,
        prefix: bool = False,
        node_name: str | None = None,
        where: Mapping[str, Any] | None = None,
        keep: int = 0,
        children: str | None = None,
    ) -> int:
        """Drop the matching checkpoints, atomically (`BaseStore.purge`)."""
        args = self._purge_args(execution_id, prefix, node_name, where, keep, children)
        return 0 if args is None else int(await self._call("purge", *args))

    async def copy(self, source: str, target: str, *, prefix: bool = False) -> int:
        """Copy an execution (or a prefix of them) in one atomic round trip (`BaseStore.copy`)."""
        return int(await self._call("copy", *self._copy_args(source, target, prefix)))

    async def stats(self) -> StoreStats:
        """Counts, payload bytes, the owner's memory and per-op counters (`BaseStore.stats`)."""
        return StoreStats.from_dict(await self._call("stats"))

    async def memory_history(self, since: float | None = None) -> builtins.list[Sample]:
        """Memory samples of the store's owner, oldest first (`BaseStore.memory_history`)."""
        return builtins.list(await self._call("memory_history", self._since(since)))

    # -- life cycle -----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Release the store's resources; later calls raise `StoreUnavailable`; closing
        twice is fine."""

    async def __aenter__(self) -> AsyncStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

