"""`ShmstoreSaver`: a LangGraph checkpoint saver over any shmstore store (extra ``[langgraph]``).

LangGraph's ``InMemorySaver`` lives in one process, ``SqliteSaver`` writes to disk, and its
Redis saver needs Redis modules.  This saver keeps a graph's checkpoints in a shmstore
store: over a ``shmstore.serve()`` server several local processes share them (one process
runs a graph up to an ``interrupt``, another resumes it), in memory, watched by the
server's monitor; over ``MemoryStore`` it is an in-process saver; over Redis, a remote one.

How LangGraph maps onto the store:

- one thread and checkpoint namespace is one execution, ``langgraph/<thread>/<ns>``
  (``%``, ``/`` and ``#`` in either part are written ``%25``, ``%2F``, ``%23``, so the id
  is unambiguous and ``langgraph/<thread>/`` is a prefix of exactly that thread's
  executions);
- a LangGraph checkpoint is a record of node ``langgraph.checkpoint`` with id
  ``<execution>#<checkpoint id>`` and the parent checkpoint's record as parent; its state
  is ``[type, bytes]`` from the saver's ``serde.dumps_typed(checkpoint)`` (the server
  never decodes it); its metadata is our metadata, so it is filtered in the server
  (values our codec cannot encode are kept in the state instead, and cannot be filtered);
- a pending write is a record of node ``langgraph.write`` in the same execution, child of
  its checkpoint, with id ``<checkpoint record id>#<idx>#<task id>`` (saving it again keeps
  the first, as LangGraph's savers do, but for the special channels ERROR, INTERRUPT ...
  which are replaced); its state is ``[task_id, channel, type, bytes, task_path, idx]``.

So a thread's checkpoints and pending writes live in the same executions and are freed
together, and every LangGraph call is one round trip (`BaseStore.find`, ``save``,
``save_many``/`BaseStore.save_new`, `BaseStore.purge`, `BaseStore.copy`).

Example:
    >>> import shmstore
    >>> from shmstore.langgraph import ShmstoreSaver
    >>> with shmstore.serve():                       # exports the server to children
    ...     graph = builder.compile(checkpointer=ShmstoreSaver())
    ...     graph.invoke(inputs, {"configurable": {"thread_id": "t1"}})
"""

from __future__ import annotations

import asyncio
import builtins
import random
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar, cast
from urllib.parse import unquote

try:  # first, so that without the extra the error says which one to install
    import langgraph.checkpoint.base  # noqa: F401
except ImportError as exc:
    raise ImportError(
        f"shmstore.langgraph needs LangGraph ({exc}); install the extra: "
        'pip install "shmstore[langgraph]" (from a clone: pip install ".[langgraph]")',
        name=exc.name,
    ) from exc

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    CheckpointMetadata,
    CheckpointTuple,
    PendingWrite,
    get_checkpoint_id,
    get_checkpoint_metadata,
    writes_sort_key,
)
from langgraph.checkpoint.base import Checkpoint as LangGraphCheckpoint
from langgraph.checkpoint.serde.base import SerializerProtocol

from ..aio.store import AsyncStore
from ..core.checkpoint import Checkpoint
from ..core.errors import ConfigError, EncodeError
from ..core.store import BaseStore, OneOf

__all__ = ["CHECKPOINT_NODE", "PREFIX", "WRITE_NODE", "ShmstoreSaver"]

#: Every execution this saver writes starts with this.
PREFIX = "langgraph/"
#: Node name of the records that hold LangGraph checkpoints.
CHECKPOINT_NODE = "langgraph.checkpoint"
#: Node name of the records that hold pending writes (children of their checkpoint).
WRITE_NODE = "langgraph.write"

PRUNE_STRATEGIES = ("keep_latest", "delete")

_T = TypeVar("_T")
#: What `BaseStore.find` answers: checkpoints with their children.
_Found = list[tuple[Checkpoint, list[Checkpoint]]]


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace("/", "%2F").replace("#", "%23")


def _thread_prefix(thread_id: object) -> str:
    return f"{PREFIX}{_escape(str(thread_id))}/"


def _execution(thread_id: object, checkpoint_ns: str) -> str:
    return f"{PREFIX}{_escape(str(thread_id))}/{_escape(checkpoint_ns)}"


def _record_id(execution: str, checkpoint_id: str) -> str:
    return f"{execution}#{_escape(checkpoint_id)}"


def _parse_execution(execution: str) -> tuple[str, str]:
    """(thread_id, checkpoint_ns) of an execution id this saver made."""
    thread, _, ns = execution[len(PREFIX):].partition("/")
    return unquote(thread), unquote(ns)


def _local_id(record_id: str, execution: str) -> str:
    """The LangGraph checkpoint id inside a record id (or parent id) of ``execution``."""
    return unquote(record_id[len(execution) + 1:])


def _config(thread_id: Any, checkpoint_ns: str, checkpoint_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": checkpoint_ns,
                             "checkpoint_id": checkpoint_id}}


class ShmstoreSaver(BaseCheckpointSaver[str]):
    """A LangGraph checkpoint saver that keeps checkpoints in a shmstore store.

    Over a `shmstore.serve` server, every process that connects shares the same threads:
    a graph interrupted in one process is resumed in another, with no server to install
    and nothing written to disk.  It implements the whole `BaseCheckpointSaver`
    interface, the extended ``delete_for_runs``, ``copy_thread`` and ``prune`` included,
    each with its async twin (run in a worker thread); each call is one round trip.

    Parameters:
        store: where the checkpoints live; default ``shmstore.connect()``, the server named
            by the environment (`serve` exports it to the processes it starts), which the
            saver then closes with itself.
        serde: LangGraph serializer for checkpoints and writes (default LangGraph's own).

    Raises:
        ConfigError: no store given and none named by the environment.

    Example:
        >>> from shmstore.langgraph import ShmstoreSaver
        >>> graph = builder.compile(checkpointer=ShmstoreSaver(shmstore.MemoryStore()))
    """

    def __init__(self, store: BaseStore | None = None, *,
                 serde: SerializerProtocol | None = None,
                 astore: AsyncStore | None = None, native_async: bool = True) -> None:
        super().__init__(serde=serde)
        if store is None:
            from ..core.factory import connect

            store = connect()
            self._owns_store = True
        elif not isinstance(store, BaseStore):
            raise ConfigError(f"store must be a shmstore store, not {type(store).__name__}",
                              value=repr(store)[:80])
        else:
            self._owns_store = False
        if astore is not None and not isinstance(astore, AsyncStore):
            raise ConfigError(f"astore must be a shmstore.aio store, not "
                              f"{type(astore).__name__}", value=repr(astore)[:80])
        self.store: BaseStore = store
        self.astore = astore
        self._native = bool(native_async)
        # The async twin of ``store`` opened for each event loop (an async store belongs
        # to one loop); None where there is none (a Redis store: worker threads).
        self._twins: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncStore | None] \
            = weakref.WeakKeyDictionary()

    def _async_store(self) -> AsyncStore | None:
        """The async store for the running loop: ``astore``, or the twin of ``store`` opened
        for this loop, or None (the sync call then runs on a worker thread)."""
        if self.astore is not None:
            return self.astore
        if not self._native:
            return None
        loop = asyncio.get_running_loop()
        try:
            return self._twins[loop]
        except KeyError:
            twin = self._twins[loop] = _twin(self.store)
            return twin

    async def _run_async(self, call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``call`` off the event loop, on a worker thread."""
        return await asyncio.to_thread(call, *args, **kwargs)

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the store if the saver opened it (a store it was given stays open), and
        the async twins it opened."""
        from ..aio.shared import AsyncSharedStore

        for twin in list(self._twins.values()):
            if isinstance(twin, AsyncSharedStore):
                twin.close_now()
        self._twins.clear()
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> ShmstoreSaver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> ShmstoreSaver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        twin = self._twins.pop(asyncio.get_running_loop(), None)
        if twin is not None:
            await twin.aclose()
        self.close()

    # -- decoding -------------------------------------------------------------------------

    def _tuple(self, thread_id: Any, checkpoint_ns: str, record: Checkpoint,
               writes: list[Checkpoint]) -> CheckpointTuple:
        execution = record.execution_id
        loads = self.serde.loads_typed
        state = record.state
        checkpoint: LangGraphCheckpoint = loads((state[0], state[1]))
        metadata: dict[str, Any] = record.metadata
        if len(state) > 2:  # metadata values our codec could not encode
            metadata = {**metadata, **loads((state[2], state[3]))}
        parent = record.parent_id
        pending: list[PendingWrite] = []
        if writes:
            ordered = sorted((w.state for w in writes),
                             key=lambda s: writes_sort_key(s[4], s[0], s[5]))
            pending = [(s[0], s[1], loads((s[2], s[3]))) for s in ordered]
        return CheckpointTuple(
            config=_config(thread_id, checkpoint_ns, _local_id(record.id, execution)),
            checkpoint=checkpoint,
            metadata=metadata,  # type: ignore[arg-type]
            parent_config=None if parent is None else _config(
                thread_id, checkpoint_ns, _local_id(parent, execution)),
            pending_writes=pending,
        )

    def _split_metadata(self, metadata: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        """Metadata our codec encodes, and the rest as ``[type, bytes]`` from serde."""
        encode = self.store.codec.encode
        plain: dict[str, Any] = {}
        other: dict[str, Any] = {}
        for key, value in metadata.items():
            try:
                encode({key: value}, root="metadata")
            except EncodeError:
                other[key] = value
            else:
                plain[key] = value
        return plain, list(self.serde.dumps_typed(other))

    # -- the saver interface --------------------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint named by ``config`` (its latest without ``checkpoint_id``), with
        its pending writes, or None."""
        thread_id, checkpoint_ns, query = _get_query(config)
        return self._got(thread_id, checkpoint_ns, self.store.find(**query))

    def _got(self, thread_id: Any, checkpoint_ns: str,
             found: _Found) -> CheckpointTuple | None:
        return self._tuple(thread_id, checkpoint_ns, *found[0]) if found else None

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        """Checkpoints by checkpoint id, greatest first, as LangGraph's savers order them:
        of one thread and namespace, of every namespace of a thread (config without
        ``checkpoint_ns``), or of every thread (config None).

        ``filter`` (metadata equality) and ``limit`` apply in the server; ``before`` too
        within one namespace.
        """
        query = _list_query(config, filter, before, limit)
        if query is not None:
            yield from self._listed(config, limit, query, self.store.find(**query.find))

    def _listed(self, config: RunnableConfig | None, limit: int | None, query: _ListQuery,
                found: _Found) -> Iterator[CheckpointTuple]:
        """The tuples of ``find``'s answer to ``query`` (filtered here where it could not
        be in the server)."""
        conf = config["configurable"] if config else {}
        count = 0
        for record, writes in found:
            thread_id, ns = _parse_execution(record.execution_id)
            if not query.in_server:
                local = _local_id(record.id, record.execution_id)
                if (query.only and local != query.only) or (
                        query.before_id and local >= query.before_id):
                    continue
            yield self._tuple(conf.get("thread_id", thread_id) if config else thread_id,
                              ns, record, writes)
            count += 1
            if limit is not None and count >= limit:
                return

    def _put_record(self, config: RunnableConfig, checkpoint: LangGraphCheckpoint,
                    metadata: CheckpointMetadata) -> tuple[Checkpoint, RunnableConfig]:
        """The record ``put`` saves, and the config it returns."""
        conf = config["configurable"]
        thread_id = conf["thread_id"]
        checkpoint_ns = conf.get("checkpoint_ns", "")
        execution = _execution(thread_id, checkpoint_ns)
        parent = conf.get("checkpoint_id")
        meta: dict[str, Any] = dict(get_checkpoint_metadata(config, metadata))
        state: list[Any] = list(self.serde.dumps_typed(checkpoint))
        record = Checkpoint(
            execution_id=execution, node_name=CHECKPOINT_NODE, state=state, metadata=meta,
            parent_id=_record_id(execution, parent) if parent else None,
            id=_record_id(execution, checkpoint["id"]))
        return record, _config(thread_id, checkpoint_ns, checkpoint["id"])

    def _unencodable(self, record: Checkpoint, exc: EncodeError) -> Checkpoint:
        """``record`` with the metadata our codec could not encode moved into its state
        (re-raises ``exc`` if the state was the problem)."""
        if not str(exc.path).startswith("metadata"):
            raise exc
        meta, other = self._split_metadata(record.metadata)
        return Checkpoint(
            execution_id=record.execution_id, node_name=CHECKPOINT_NODE,
            state=record.state + other, metadata=meta, parent_id=record.parent_id,
            id=record.id)

    def put(
        self,
        config: RunnableConfig,
        checkpoint: LangGraphCheckpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Store a checkpoint (one record: its contents through ``serde``, its metadata as
        ours) and return the config that names it."""
        record, named = self._put_record(config, checkpoint, metadata)
        try:
            self.store.save(record)
        except EncodeError as exc:
            self.store.save(self._unencodable(record, exc))
        return named

    def _write_records(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                       task_id: str, task_path: str,
                       ) -> tuple[builtins.list[Checkpoint], builtins.list[Checkpoint]]:
        """The records of a task's writes: (regular ones, kept if new; special ones,
        replacing what their slot held)."""
        conf = config["configurable"]
        execution = _execution(conf["thread_id"], conf.get("checkpoint_ns", ""))
        parent = _record_id(execution, conf["checkpoint_id"])
        dumps = self.serde.dumps_typed
        special: list[Checkpoint] = []
        regular: list[Checkpoint] = []
        for idx, (channel, value) in enumerate(writes):
            key = WRITES_IDX_MAP.get(channel, idx)
            kind, data = dumps(value)
            (special if channel in WRITES_IDX_MAP else regular).append(Checkpoint(
                execution_id=execution, node_name=WRITE_NODE, parent_id=parent,
                id=f"{parent}#{key}#{task_id}",
                state=[task_id, channel, kind, data, task_path, key]))
        return regular, special

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Store a task's writes against a checkpoint, as LangGraph's ``InMemorySaver``:
        a write to a special channel (ERROR, INTERRUPT, ...) replaces what its slot held; a
        regular write is added only if its (task, index) slot is empty.

        One round trip (two when a call mixes special and regular channels).
        """
        if not writes:
            return
        regular, special = self._write_records(config, writes, task_id, task_path)
        if regular:
            self.store.save_new(regular)
        if special:
            self.store.save_many(special)

    def delete_thread(self, thread_id: str) -> None:
        """Drop every checkpoint and pending write of the thread, all namespaces."""
        self.store.purge(**_delete_thread(thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Drop the checkpoints whose metadata ``run_id`` is one of ``run_ids``, with their
        pending writes, in every thread."""
        if run_ids:
            self.store.purge(**_delete_for_runs(run_ids))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint and pending write of a thread (all namespaces, the whole
        parent chain) to another thread, in their order."""
        if str(source_thread_id) != str(target_thread_id):
            self.store.copy(**_copy_thread(source_thread_id, target_thread_id))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """Prune threads: ``"keep_latest"`` keeps the latest checkpoint of each namespace
        and its pending writes, ``"delete"`` drops everything.

        A graph with ``DeltaChannel`` channels needs the ancestors back to a snapshot:
        do not ``keep_latest`` its threads.

        Raises:
            ConfigError: an unknown strategy.
        """
        query = _prune(thread_ids, strategy)
        if query is not None:
            self.store.purge(**query)

    def get_next_version(self, current: str | None, channel: None) -> str:
        """The next channel version: an increasing counter and a random tie-breaker."""
        if current is None:
            number = 0
        elif isinstance(current, int):
            number = current
        else:
            number = int(current.split(".")[0])
        return f"{number + 1:032}.{random.random():016}"

    # -- async twins: native on an async store, else the sync call on a worker thread ------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """`get_tuple`, as a coroutine."""
        astore = self._async_store()
        if astore is None:
            return await self._run_async(self.get_tuple, config)
        thread_id, checkpoint_ns, query = _get_query(config)
        return self._got(thread_id, checkpoint_ns, await astore.find(**query))

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """`list`, as an async iterator (one round trip)."""
        astore = self._async_store()
        if astore is None:
            found = await self._run_async(
                lambda: list(self.list(config, filter=filter, before=before, limit=limit)))
        else:
            query = _list_query(config, filter, before, limit)
            found = [] if query is None else list(self._listed(
                config, limit, query, await astore.find(**query.find)))
        for item in found:
            yield item

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: LangGraphCheckpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """`put`, as a coroutine."""
        astore = self._async_store()
        if astore is None:
            return await self._run_async(self.put, config, checkpoint, metadata, new_versions)
        record, named = self._put_record(config, checkpoint, metadata)
        try:
            await astore.save(record)
        except EncodeError as exc:
            await astore.save(self._unencodable(record, exc))
        return named

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """`put_writes`, as a coroutine."""
        astore = self._async_store()
        if astore is None:
            await self._run_async(self.put_writes, config, writes, task_id, task_path)
            return
        if not writes:
            return
        regular, special = self._write_records(config, writes, task_id, task_path)
        if regular:
            await astore.save_new(regular)
        if special:
            await astore.save_many(special)

    async def adelete_thread(self, thread_id: str) -> None:
        """`delete_thread`, as a coroutine."""
        astore = self._async_store()
        if astore is None:
            await self._run_async(self.delete_thread, thread_id)
        else:
            await astore.purge(**_delete_thread(thread_id))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """`delete_for_runs`, as a coroutine."""
        astore = self._async_store()
        if astore is None:
            await self._run_async(self.delete_for_runs, run_ids)
        elif run_ids:
            await astore.purge(**_delete_for_runs(run_ids))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """`copy_thread`, as a coroutine."""
        astore = self._async_store()
        if astore is None:
            await self._run_async(self.copy_thread, source_thread_id, target_thread_id)
        elif str(source_thread_id) != str(target_thread_id):
            await astore.copy(**_copy_thread(source_thread_id, target_thread_id))

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """`prune`, as a coroutine."""
        astore = self._async_store()
        if astore is None:
            await self._run_async(self.prune, thread_ids, strategy=strategy)
            return
        query = _prune(thread_ids, strategy)
        if query is not None:
            await astore.purge(**query)


def _twin(store: BaseStore) -> AsyncStore | None:
    """An async store over the same checkpoints as ``store``, in the running loop (None
    for a store without one: Redis)."""
    from ..aio.memory import AsyncMemoryStore
    from ..aio.shared import AsyncSharedStore
    from ..backends.memory import MemoryStore
    from ..backends.shared import SharedStore

    if isinstance(store, SharedStore):
        return AsyncSharedStore(store.url, authkey=store._authkey, timeout=store.timeout,
                                name=store.name, codec=store.codec,
                                **cast(dict[str, Any], store._options))
    if isinstance(store, MemoryStore):
        try:
            return AsyncMemoryStore(store)
        except ConfigError:  # closed: its calls fail on the sync path as they should
            return None
    return None


class _ListQuery(NamedTuple):
    find: dict[str, Any]  # find's arguments
    in_server: bool  # every filter applied in the server
    only: str | None  # else: the checkpoint id to keep ...
    before_id: str | None  # ... and the one to stay below


def _get_query(config: RunnableConfig) -> tuple[Any, str, dict[str, Any]]:
    """``get_tuple``'s thread, namespace and ``find`` arguments."""
    conf = config["configurable"]
    thread_id = conf["thread_id"]
    checkpoint_ns = conf.get("checkpoint_ns", "")
    execution = _execution(thread_id, checkpoint_ns)
    checkpoint_id = get_checkpoint_id(config)
    # Without an id, the latest is the greatest checkpoint id, as LangGraph's savers
    # have it (not the last saved: copies and late puts come out of id order).
    return thread_id, checkpoint_ns, {
        "execution_id": execution, "node_name": CHECKPOINT_NODE, "limit": 1,
        "children": WRITE_NODE, "by_id": True,
        "checkpoint_id": None if not checkpoint_id else _record_id(execution, checkpoint_id)}


def _list_query(config: RunnableConfig | None, filter: dict[str, Any] | None,
                before: RunnableConfig | None, limit: int | None) -> _ListQuery | None:
    """``list``'s ``find`` (None: nothing to list)."""
    if limit is not None and limit <= 0:
        return None
    conf = config["configurable"] if config else {}
    checkpoint_ns = conf.get("checkpoint_ns")
    only = get_checkpoint_id(config) if config else None
    before_id = get_checkpoint_id(before) if before else None
    if config is None:
        scope, exact = PREFIX, False
    elif checkpoint_ns is None:
        scope, exact = _thread_prefix(conf["thread_id"]), False
    else:
        scope, exact = _execution(conf["thread_id"], checkpoint_ns), True
    # Within one execution ids compare as LangGraph's do; across several, filter here.
    in_server = exact or (not before_id and not only)
    return _ListQuery(find={
        "execution_id": scope, "prefix": not exact, "node_name": CHECKPOINT_NODE,
        "where": filter or None,
        "before_id": _record_id(scope, before_id) if exact and before_id else None,
        "checkpoint_id": _record_id(scope, only) if exact and only else None,
        "limit": limit if in_server else None, "children": WRITE_NODE, "by_id": True,
    }, in_server=in_server, only=only, before_id=before_id)


def _delete_thread(thread_id: str) -> dict[str, Any]:
    return {"execution_id": _thread_prefix(thread_id), "prefix": True}


def _delete_for_runs(run_ids: Sequence[str]) -> dict[str, Any]:
    return {"execution_id": PREFIX, "prefix": True, "node_name": CHECKPOINT_NODE,
            "where": {"run_id": OneOf(*run_ids)}, "children": WRITE_NODE}


def _copy_thread(source_thread_id: str, target_thread_id: str) -> dict[str, Any]:
    return {"source": _thread_prefix(source_thread_id),
            "target": _thread_prefix(target_thread_id), "prefix": True}


def _prune(thread_ids: Sequence[str], strategy: str) -> dict[str, Any] | None:
    """``prune``'s ``purge`` (None: nothing to prune).

    Raises:
        ConfigError: an unknown strategy.
    """
    if strategy not in PRUNE_STRATEGIES:
        raise ConfigError(f"prune strategy must be one of {PRUNE_STRATEGIES}, not "
                          f"{strategy!r}", value=repr(strategy)[:80])
    if not thread_ids:
        return None
    prefixes = [_thread_prefix(t) for t in thread_ids]
    if strategy == "delete":
        return {"execution_id": prefixes, "prefix": True}
    return {"execution_id": prefixes, "prefix": True, "node_name": CHECKPOINT_NODE, "keep": 1,
            "children": WRITE_NODE}
