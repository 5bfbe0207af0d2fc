"""`Backend`: the typed boundary between `BaseStore` and wherever checkpoints live.

`BaseStore` checks arguments and encodes checkpoints into `Record` tuples; a backend
runs one table operation per method: in this process (`CheckpointTable`), in the server process
(`SharedStore`'s proxy, which sends the method's name and arguments), or in Redis
(`RedisStore`'s scripts).  `TableOps` is what a `CheckpointTable` does; `Backend` adds
what the owner of a table does besides (memory history, client registration).

The operation names are derived from these protocols (`TABLE_OPS`, `BACKEND_OPS`), so
the server's dispatch, the stats counters and every backend follow one list.  Shapes
that cross the wire are tuples, lists and plain dicts (msgpack arrays and maps); a
receiver rebuilds `Record` tuples with `Record._make`.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Literal, NoReturn, Protocol, TypedDict, cast

from .limits import LimitsDict
from .record import Record

__all__ = ["ANSWERS_RECORDS", "BACKEND_OPS", "BUSY", "DONE", "GRANTED", "HELD", "ROLE_CLI",
           "ROLE_MONITOR", "ROLE_WORKER", "SAVED", "TABLE_OPS", "TOOL_ROLES", "Backend",
           "ClaimAnswer", "ClientInfo", "CompleteAnswer", "EncodedWhere", "Found", "Sample",
           "StatsDict", "TableOps", "client_state", "closed_backend"]

# What ``claim`` and ``complete`` answer, first item of their (kind, value) pair.
DONE: Final = "done"          # value: the node's latest record
GRANTED: Final = "granted"    # value: the lease token
BUSY: Final = "busy"          # value: the owner holding the lease (the wait ran out)
HELD: Final = "held"          # value: the owner, who is the caller itself (a re-entrant call)
SAVED: Final = "saved"        # value: the version assigned to the completed record

#: ``claim``: the node's record, or a lease token / owner (narrow on ``answer[0]``).
ClaimAnswer = (tuple[Literal["done"], Record]
               | tuple[Literal["granted", "busy", "held"], str])
#: ``complete``: the version given to the record, or the record another completed first.
CompleteAnswer = tuple[Literal["saved"], int] | tuple[Literal["done"], Record]
#: A metadata filter: key -> msgpack encodings of the values it may have (any of them).
EncodedWhere = Mapping[str, Sequence[bytes]]
#: ``find``: a record and its children (oldest first; empty unless asked for).
Found = tuple[Record, builtins.list[Record]]


#: Client roles: the store's own tools (hidden by default in views) and the default.
ROLE_WORKER: Final = "worker"
ROLE_CLI: Final = "cli"
ROLE_MONITOR: Final = "monitor"
TOOL_ROLES: Final = frozenset({ROLE_CLI, ROLE_MONITOR})


def client_state(alive: bool, state: str | None) -> str:
    """A client's ``alive``/``exited``/``gone``: its ``state``, or from its alive flag
    alone when a server from before client states sent none (an end it cannot tell)."""
    return state or ("alive" if alive else "gone")


class ClientInfo(TypedDict):
    """A registered client process, as of the last sample (or of ``stats``, which checks
    liveness when asked)."""

    pid: int
    name: str
    rss: int
    peak_rss: int
    alive: bool
    #: ``worker`` (the default), ``cli``, ``monitor``, or the role the client gave.
    role: str
    #: ``alive``; ``exited`` (it said so at exit); ``gone`` (it vanished without a word:
    #: killed, or crashed).
    state: str
    #: Proportional set size: shared pages (a data-plane mapping) divided among the
    #: processes that map them; None until read (it is read less often than RSS).
    pss: int | None


class _StatsBase(TypedDict):
    checkpoints: int
    executions: int
    payload_bytes: int
    ops: dict[str, int]
    largest_executions: builtins.list[tuple[str, int, int]]
    evictions: int
    rejections: int
    pruned: int
    limits: LimitsDict
    server_pid: int
    server_rss: int
    server_peak_rss: int
    uptime_s: float


class StatsDict(_StatsBase, total=False):
    """What ``stats`` answers (`StoreStats` is built from it); ``clients`` is the
    server's (a bare table has none), and so are the sealed memory segments it holds."""

    clients: builtins.list[ClientInfo]
    segments: int
    segment_bytes: int
    malloc_arenas: int | None


class Sample(TypedDict):
    """One memory sample of the store's owner (`BaseStore.memory_history`)."""

    t: float
    server_rss: int
    server_uss: int | None
    checkpoints: int
    payload_bytes: int
    #: Bytes of the sealed memory segments the server holds: shared memory, not its heap.
    segment_bytes: int
    # pid -> [name, rss, alive, pss, role, state] (pss None between readings; an older
    # server sends the first four)
    clients: dict[str, builtins.list[str | int | bool | None]]
    #: The largest executions then, largest first: ``[execution, checkpoints, bytes]``
    #: (at most 5; the rest of ``payload_bytes`` is the others'; an older server sends none).
    executions: builtins.list[builtins.list[str | int]]


class TableOps(Protocol):
    """The table operations: one method each, the same on every backend."""

    def save(self, record: Record, expected_version: int | None = None) -> int: ...

    def save_many(self, records: Sequence[Record]) -> builtins.list[int]: ...

    def load(self, checkpoint_id: str) -> Record: ...

    def load_many(self, checkpoint_ids: Sequence[str]) -> builtins.list[Record]: ...

    def list(self, execution_id: str, limit: int | None = None,
             before_version: int | None = None, newest_first: bool = False,
             after_version: int | None = None) -> builtins.list[Record]: ...

    def latest(self, execution_id: str) -> Record | None: ...

    def delete(self, checkpoint_id: str) -> bool: ...

    def clear(self, execution_id: str) -> int: ...

    def executions(self) -> builtins.list[str]: ...

    def wait(self, execution_id: str, after_version: int = 0, timeout: float | None = None,
             generation: int = 0) -> tuple[Record | None, int]: ...

    def stats(self) -> StatsDict: ...

    def claim(self, execution_id: str, node_name: str, owner: str, lease_s: float,
              timeout: float = 0.0) -> ClaimAnswer: ...

    def renew(self, execution_id: str, node_name: str, token: str, lease_s: float) -> bool: ...

    def release(self, execution_id: str, node_name: str, token: str) -> bool: ...

    def complete(self, record: Record, token: str) -> CompleteAnswer: ...

    def limits(self) -> LimitsDict: ...

    # LangGraph support: generic queries over several executions.
    def find(self, executions: Sequence[str], prefix: bool = False,
             node_name: str | None = None, where: EncodedWhere | None = None,
             before_id: str | None = None, limit: int | None = None,
             checkpoint_id: str | None = None, children: str | None = None,
             by_id: bool = False) -> builtins.list[Found]: ...

    def save_new(self, records: Sequence[Record]) -> builtins.list[int]: ...

    def purge(self, executions: Sequence[str], prefix: bool = False,
              node_name: str | None = None, where: EncodedWhere | None = None,
              keep: int = 0, children: str | None = None) -> int: ...

    def copy(self, source: str, target: str, prefix: bool = False) -> int: ...


class Backend(TableOps, Protocol):
    """A store's whole boundary: the table operations and its owner's own."""

    def memory_history(self, since: float | None = None) -> builtins.list[Sample]: ...

    def register_client(self, pid: int, name: str = "", role: str = ROLE_WORKER,
                        leaving: bool = False) -> None: ...


def _ops(protocol: type) -> tuple[str, ...]:
    """The public methods a protocol class itself defines, in definition order."""
    return tuple(name for name, value in vars(protocol).items()
                 if not name.startswith("_") and callable(value))


#: The table operations, in definition order (the server's stats counters follow it).
TABLE_OPS: Final = _ops(TableOps)
#: Every operation a client may ask of a store's owner.
BACKEND_OPS: Final = TABLE_OPS + _ops(Backend)


def _answers_records(protocol: type) -> frozenset[str]:
    """The operations whose answers may hold records (read from their annotations): only
    their answers can carry a record's state as a memory segment."""
    names = ("Record", "ClaimAnswer", "CompleteAnswer", "Found")
    return frozenset(
        op for op in BACKEND_OPS
        if any(name in str(getattr(protocol, op).__annotations__.get("return", ""))
               for name in names))


#: The operations whose answers may hold records (and so memory segments).
ANSWERS_RECORDS: Final = _answers_records(Backend)


class _Closed:
    """A backend whose every operation raises: what a closed store calls, at no cost to
    an open one (the store swaps its backend for this instead of checking a flag)."""

    __slots__ = ("_error",)

    def __init__(self, error: Callable[[], Exception]) -> None:
        self._error = error

    def __getattr__(self, name: str) -> Callable[..., NoReturn]:
        if name not in BACKEND_OPS:
            raise AttributeError(name)

        def refuse(*args: object, **kwargs: object) -> NoReturn:
            raise self._error()

        return refuse


def closed_backend(error: Callable[[], Exception]) -> Backend:
    """A `Backend` whose every operation raises ``error()``."""
    return cast(Backend, _Closed(error))
