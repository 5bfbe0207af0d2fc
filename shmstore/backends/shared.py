"""`SharedStore`: the store as seen from any process (`core.factory.connect` builds it).

The store's `Backend` is `_Remote`, a typed proxy: each method sends its name and
arguments through one path, `SharedStore._request` (encode the request, send, read the
answer, and translate whatever went wrong into the exception tree), and rebuilds the
`Record` tuples of the answer from msgpack's arrays.  A call takes
an idle connection from the store's pool, or opens one, and gives it back when the
answer is in: threads never share a connection mid-call, and threads that come and go
(LangGraph runs each invocation on fresh ones) reuse connections instead of leaving one
each behind.  A child process never touches its parent's connections (a connection shared
across fork would be corrupted, cpython gh-101320); a connection that failed or timed out
mid-call is dropped, never reused out of step, and the next call opens a new one.
"""

from __future__ import annotations

import atexit
import builtins
import os
import select
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

from ..core import segment
from ..core.backend import (
    ANSWERS_RECORDS,
    DONE,
    ROLE_WORKER,
    Backend,
    ClaimAnswer,
    CompleteAnswer,
    EncodedWhere,
    Found,
    Sample,
    StatsDict,
)
from ..core.codec import MsgpackCodec
from ..core.config import DEFAULT_TIMEOUT, Address, coerce_authkey, parse_url
from ..core.errors import ConfigError, ShmstoreError, StoreUnavailable
from ..core.limits import LimitsDict
from ..core.record import Record
from ..core.store import BaseStore
from ..core.validate import count, duration
from .wire import Channel, open_connection, translate

__all__ = ["ANSWERS", "BLOCKING_OPS", "DEFAULT_TIMEOUT", "SharedStore", "answer"]

# Operations that block in the server, and the position of their timeout argument: the
# answer may take that long plus the usual time bound.
BLOCKING_OPS: Final = {"wait": 2, "claim": 4}


def answer(kind: str, result: Any, url: str) -> Any:
    """The result of a server's answer ``(kind, result)``, or the error it carries.

    Raises:
        ShmstoreError: the one the server raised (rebuilt by the wire), or one saying it
            failed otherwise.
    """
    if kind == "#RETURN":
        return result
    if kind == "#ERROR" and isinstance(result, BaseException):
        raise result
    raise ShmstoreError(f"the server at {url} failed: {result}")


def client_settings(url: str, *, authkey: bytes | str, timeout: float, data_plane: bool,
                    data_plane_threshold: int, role: str
                    ) -> tuple[Address, bytes, float, int | None, int, str]:
    """A server client's options, checked (the sync and the async client take the same):
    ``(address, authkey, timeout, plane threshold or None, threshold, role)``; the plane
    is on only for a unix socket where memory files can be made.

    Raises:
        ConfigError: a bad URL, authkey, timeout, threshold or role.
    """
    address = parse_url(url)
    key = coerce_authkey(authkey)
    seconds = duration(timeout, "timeout")
    threshold = count(data_plane_threshold, "data_plane_threshold", minimum=1)
    plane = threshold if data_plane and address.family == "AF_UNIX" and segment.available() \
        else None
    if not isinstance(role, str) or not 0 < len(role) <= 64:
        raise ConfigError(f"role must be a non-empty str of at most 64 characters, not "
                          f"{role!r:.80}", value=repr(role)[:80])
    return address, key, seconds, plane, threshold, role


class SharedStore(BaseStore):
    """A store whose checkpoints live in a shmstore server process.

    Use it from any number of threads and processes; pass it to a child process (spawn)
    or keep it across fork.  It holds as many connections as calls have run at once in
    this process (idle ones wait in a pool), never one per thread that ever called.

    Parameters:
        url: the server's URL (``unix:///...`` or ``tcp://host:port``).
        authkey: the server's key, bytes or hex.
        timeout: seconds any call may take before `StoreTimeout`.
        name: how this client is named in the server's thread names.
        codec: encodes states and metadata.
        data_plane: on a unix socket, send states of at least ``data_plane_threshold``
            bytes as sealed shared memory (if the server takes it) and map the ones it
            sends back; False: every state is bytes on the socket.
        data_plane_threshold: the smallest encoded state (and numpy array inside one)
            that travels as shared memory; default `segment.DEFAULT_THRESHOLD`.
        copy_on_load: give the numpy arrays of shared-memory states as private writable
            copies; default read-only views of the shared pages (``load(copy=...)``
            decides per call).
        role: what this process is to the server's monitor: ``worker`` (the default),
            ``cli`` or ``monitor`` (the store's own tools, hidden by default in its
            views), or a role of your own.

    Raises:
        ConfigError: a bad URL, authkey, timeout or threshold.
    """

    def __init__(
        self,
        url: str,
        *,
        authkey: bytes | str,
        timeout: float = DEFAULT_TIMEOUT,
        name: str | None = None,
        codec: MsgpackCodec | None = None,
        data_plane: bool = True,
        data_plane_threshold: int = segment.DEFAULT_THRESHOLD,
        copy_on_load: bool = False,
        role: str = ROLE_WORKER,
    ) -> None:
        super().__init__(codec=codec)
        self._address, self._authkey, self.timeout, plane, threshold, self.role = \
            client_settings(url, authkey=authkey, timeout=timeout, data_plane=data_plane,
                            data_plane_threshold=data_plane_threshold, role=role)
        if plane is not None:
            self._plane_threshold = plane
        self.url = self._address.url
        self._options = {"data_plane": bool(data_plane), "data_plane_threshold": threshold,
                         "copy_on_load": bool(copy_on_load), "role": role}
        self.copy_on_load = bool(copy_on_load)
        self._named = name is not None  # a default name follows the store to each process
        self.name = name or f"client-{os.getpid()}"
        _STORES.add(self)
        self._idle: list[Channel] = []  # list.pop and list.append are atomic
        self._conns: set[Channel] = set()  # every open connection of this process
        self._conns_lock = threading.Lock()
        self._closed = False
        self._backend = _Remote(self)

    def __repr__(self) -> str:
        return f"<SharedStore {self.url}>"

    def __del__(self) -> None:
        # A store dropped without close() (a function's local, a child's argument) is done
        # with too: close it, saying goodbye, so its process ends "exited", not "gone".
        try:
            if not self._closed:
                self.close()
        except Exception:  # at interpreter shutdown, there is nothing left to tell
            pass

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses to spawned children through multiprocessing's pipe, never a command line.
        return (_rebuild, (self.url, self._authkey.hex(), self.timeout,
                           self.name if self._named else None, self._options))

    def _forget_parent(self) -> None:
        """In a forked child: the parent owns the inherited sockets; leave them alone."""
        self._idle, self._conns, self._conns_lock = [], set(), threading.Lock()
        if not self._named:
            self.name = f"client-{os.getpid()}"

    def _connection(self) -> Channel:
        """An idle connection of this process, or a new one."""
        try:
            return self._idle.pop()
        except IndexError:
            pass
        if self._closed:
            raise self._closed_error()
        conn = open_connection(self._address, self._authkey, timeout=self.timeout,
                               name=f"{self.name}/{threading.current_thread().name}",
                               data_plane=self._plane_threshold is not None, role=self.role)
        with self._conns_lock:
            self._conns.add(conn)
        return conn

    def _closed_error(self, running: str | None = None) -> StoreUnavailable:
        """What a call on a closed store raises (``running``: the op it closed under)."""
        during = "" if running is None else f" while its {running!r} call ran"
        return StoreUnavailable(f"this store was closed{during} ({self.url})",
                                address=self.url)

    def _discard(self, conn: Channel) -> None:
        with self._conns_lock:
            self._conns.discard(conn)
        try:
            conn.close()
        except OSError:
            pass

    def _request(self, op: str, args: tuple[object, ...]) -> Any:
        """Run ``op`` in the server: one round trip; the answer as msgpack decoded it."""
        conn = self._connection()
        try:
            conn.send_message((op, args))
            slot = BLOCKING_OPS.get(op)
            if slot is not None and not conn.pending() and not select.select(
                [conn.fd], [], [], cast(float, args[slot]) + self.timeout
            )[0]:
                raise TimeoutError
            kind, result = conn.unpack(conn.recv(op in ANSWERS_RECORDS))
        except BaseException as exc:
            # Whatever happened, this connection may be out of step: never reuse it.
            self._discard(conn)
            if self._closed and isinstance(exc, (OSError, EOFError)):  # closed under us
                raise self._closed_error(op) from None
            raise translate(exc, self.url, self.timeout) from None
        if self._closed:
            self._discard(conn)
        else:
            self._idle.append(conn)
        return answer(kind, result, self.url)

    def close(self) -> None:
        """Close every connection this store opened; later calls raise `StoreUnavailable`
        (a call blocked in another thread too, at once; a ``follow`` ends).

        The server is told this process is done (so its monitor shows it "exited" once it
        ends, not "gone"), over an idle connection and without waiting for an answer:
        closing never waits on a server, whatever state it is in.
        """
        if not self._closed and self._idle:
            try:
                self._idle[-1].send_message(
                    ("register_client", (os.getpid(), self.name, self.role, True)))
            except (OSError, ShmstoreError):
                pass
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, set()
        idle, self._idle = self._idle, []
        for conn in conns:
            # A call in flight (a wait, a follow) sleeps in select() on its socket, which
            # closing alone does not wake on Linux; shutting the socket down does.
            if not any(conn is other for other in idle):
                conn.shutdown()
            try:
                conn.close()
            except OSError:
                pass

    def _is_closed(self) -> bool:
        return self._closed


# A record in an answer: the server sent a `Record`, msgpack made it a list.
_make = Record._make


def _one(raw: Any) -> Record:
    # tuple.__new__, not _make: half the cost, on the hottest read (the server's
    # answer is the table's own record; a wrong length fails at the first field).
    return tuple.__new__(Record, raw)


def _records(raws: Any) -> builtins.list[Record]:
    return [_make(r) for r in raws]


def _optional(raw: Any) -> Record | None:
    return None if raw is None else _make(raw)


def _waited(answer: Any) -> tuple[Record | None, int]:
    raw, generation = answer
    return (None if raw is None else _make(raw), generation)


def _leased(answer: Any) -> Any:
    kind, value = answer
    return (DONE, _make(value)) if kind == DONE else (kind, value)


def _found(found: Any) -> builtins.list[Found]:
    return [(_make(raw), [_make(kid) for kid in kids]) for raw, kids in found]


#: How the answer of each op that holds records is rebuilt from msgpack's arrays (every
#: other answer is used as decoded); the sync and the async client share it.
ANSWERS: Final[dict[str, Callable[[Any], Any]]] = {
    "load": _one, "load_many": _records, "list": _records, "latest": _optional,
    "wait": _waited, "claim": _leased, "complete": _leased, "find": _found,
}
assert set(ANSWERS) == ANSWERS_RECORDS, "every op whose answer holds records is rebuilt"


class _Remote:
    """`SharedStore`'s backend: every method is one `SharedStore._request` of its name.

    Answers come as msgpack decoded them (a record is a list); the records in them are
    rebuilt as `Record` tuples here, nothing else is copied.  The store is held by a weak
    proxy: the store owns this object, and a cycle would keep a dropped store's sockets
    open until the cyclic collector ran.
    """

    __slots__ = ("_store",)

    def __init__(self, store: SharedStore) -> None:
        self._store = weakref.proxy(store)

    def save(self, record: Record, expected_version: int | None = None) -> int:
        version: int = self._store._request("save", (record, expected_version))
        return version

    def save_many(self, records: Sequence[Record]) -> builtins.list[int]:
        versions: builtins.list[int] = self._store._request("save_many", (records,))
        return versions

    def load(self, checkpoint_id: str) -> Record:
        return _one(self._store._request("load", (checkpoint_id,)))

    def load_many(self, checkpoint_ids: Sequence[str]) -> builtins.list[Record]:
        return _records(self._store._request("load_many", (checkpoint_ids,)))

    def list(self, execution_id: str, limit: int | None = None,
             before_version: int | None = None, newest_first: bool = False,
             after_version: int | None = None) -> builtins.list[Record]:
        # after_version is last, so that a request without it has the older shape.
        args: tuple[object, ...] = (execution_id, limit, before_version, newest_first)
        if after_version is not None:
            args += (after_version,)
        return _records(self._store._request("list", args))

    def latest(self, execution_id: str) -> Record | None:
        return _optional(self._store._request("latest", (execution_id,)))

    def delete(self, checkpoint_id: str) -> bool:
        dropped: bool = self._store._request("delete", (checkpoint_id,))
        return dropped

    def clear(self, execution_id: str) -> int:
        dropped: int = self._store._request("clear", (execution_id,))
        return dropped

    def executions(self) -> builtins.list[str]:
        names: builtins.list[str] = self._store._request("executions", ())
        return names

    def wait(self, execution_id: str, after_version: int = 0, timeout: float | None = None,
             generation: int = 0) -> tuple[Record | None, int]:
        return _waited(self._store._request("wait", (execution_id, after_version, timeout,
                                                     generation)))

    def stats(self) -> StatsDict:
        figures: StatsDict = self._store._request("stats", ())
        return figures

    def claim(self, execution_id: str, node_name: str, owner: str, lease_s: float,
              timeout: float = 0.0) -> ClaimAnswer:
        answer: ClaimAnswer = _leased(self._store._request(
            "claim", (execution_id, node_name, owner, lease_s, timeout)))
        return answer

    def renew(self, execution_id: str, node_name: str, token: str, lease_s: float) -> bool:
        held: bool = self._store._request("renew", (execution_id, node_name, token, lease_s))
        return held

    def release(self, execution_id: str, node_name: str, token: str) -> bool:
        held: bool = self._store._request("release", (execution_id, node_name, token))
        return held

    def complete(self, record: Record, token: str) -> CompleteAnswer:
        answer: CompleteAnswer = _leased(self._store._request("complete", (record, token)))
        return answer

    def limits(self) -> LimitsDict:
        limits: LimitsDict = self._store._request("limits", ())
        return limits

    def find(self, executions: Sequence[str], prefix: bool = False,
             node_name: str | None = None, where: EncodedWhere | None = None,
             before_id: str | None = None, limit: int | None = None,
             checkpoint_id: str | None = None, children: str | None = None,
             by_id: bool = False) -> builtins.list[Found]:
        return _found(self._store._request("find", (executions, prefix, node_name, where,
                                                    before_id, limit, checkpoint_id, children,
                                                    by_id)))

    def save_new(self, records: Sequence[Record]) -> builtins.list[int]:
        versions: builtins.list[int] = self._store._request("save_new", (records,))
        return versions

    def purge(self, executions: Sequence[str], prefix: bool = False,
              node_name: str | None = None, where: EncodedWhere | None = None,
              keep: int = 0, children: str | None = None) -> int:
        dropped: int = self._store._request("purge", (executions, prefix, node_name, where,
                                                      keep, children))
        return dropped

    def copy(self, source: str, target: str, prefix: bool = False) -> int:
        copied: int = self._store._request("copy", (source, target, prefix))
        return copied

    def memory_history(self, since: float | None = None) -> builtins.list[Sample]:
        samples: builtins.list[Sample] = self._store._request("memory_history", (since,))
        return samples

    def register_client(self, pid: int, name: str = "", role: str = ROLE_WORKER,
                        leaving: bool = False) -> None:
        self._store._request("register_client", (pid, name, role, leaving))


_REMOTE: Final[type[Backend]] = _Remote  # mypy checks that it is a complete Backend


# Every SharedStore of this process: a forked child drops their inherited connections
# (without a pid check on every call).
_STORES: weakref.WeakSet[SharedStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_STORES):
        store._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_at_exit() -> None:
    """At interpreter exit, close the stores still open: each says goodbye (`close`), so
    the server's monitor shows this process "exited", not "gone"."""
    for store in list(_STORES):
        if not store._closed:
            store.close()


atexit.register(_close_at_exit)


def _rebuild(url: str, authkey: str, timeout: float, name: str | None,
             options: dict[str, Any] | None = None) -> SharedStore:
    return SharedStore(url, authkey=authkey, timeout=timeout, name=name, **(options or {}))
