"""`SharedStore`: the store as seen from any process (`core.factory.connect` builds it).

Every operation goes through one path, `SharedStore._call`: encode the request, send,
read the answer, and translate whatever went wrong into the exception tree.  A call takes
an idle connection from the store's pool, or opens one, and gives it back when the
answer is in: threads never share a connection mid-call, and threads that come and go
(LangGraph runs each invocation on fresh ones) reuse connections instead of leaving one
each behind.  A child process never touches its parent's connections (a connection shared
across fork would be corrupted, cpython gh-101320); a connection that failed or timed out
mid-call is dropped, never reused out of step, and the next call opens a new one.
"""

from __future__ import annotations

import os
import select
import threading
import weakref
from typing import Any

from ..core.codec import MsgpackCodec
from ..core.config import DEFAULT_TIMEOUT, coerce_authkey, parse_url
from ..core.errors import ShmstoreError, StoreUnavailable
from ..core.store import BaseStore
from ..core.validate import duration
from .wire import Channel, open_connection, translate, unpack

__all__ = ["DEFAULT_TIMEOUT", "SharedStore"]

# Operations that block in the server, and the position of their timeout argument: the
# answer may take that long plus the usual time bound.
_BLOCKING_OPS = {"wait": 2, "claim": 4}


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

    Raises:
        ConfigError: a bad URL, authkey or timeout.
    """

    def __init__(
        self,
        url: str,
        *,
        authkey: bytes | str,
        timeout: float = DEFAULT_TIMEOUT,
        name: str | None = None,
        codec: MsgpackCodec | None = None,
    ) -> None:
        super().__init__(codec=codec)
        self._address = parse_url(url)
        self.url = self._address.url
        self._authkey = coerce_authkey(authkey)
        self.timeout = duration(timeout, "timeout")
        self._named = name is not None  # a default name follows the store to each process
        self.name = name or f"client-{os.getpid()}"
        _STORES.add(self)
        self._idle: list[Channel] = []  # list.pop and list.append are atomic
        self._conns: set[Channel] = set()  # every open connection of this process
        self._conns_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<SharedStore {self.url}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses to spawned children through multiprocessing's pipe, never a command line.
        return (_rebuild, (self.url, self._authkey.hex(), self.timeout,
                           self.name if self._named else None))

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
            raise StoreUnavailable(f"this store was closed ({self.url})", address=self.url)
        conn = open_connection(self._address, self._authkey, timeout=self.timeout,
                               name=f"{self.name}/{threading.current_thread().name}")
        with self._conns_lock:
            self._conns.add(conn)
        return conn

    def _discard(self, conn: Channel) -> None:
        with self._conns_lock:
            self._conns.discard(conn)
        try:
            conn.close()
        except OSError:
            pass

    def _call(self, op: str, *args: Any) -> Any:
        conn = self._connection()
        try:
            conn.send_message((op, args))
            slot = _BLOCKING_OPS.get(op)
            if slot is not None and not conn.pending() and not select.select(
                [conn.fd], [], [], args[slot] + self.timeout
            )[0]:
                raise TimeoutError
            kind, result = unpack(conn.recv())
        except BaseException as exc:
            # Whatever happened, this connection may be out of step: never reuse it.
            self._discard(conn)
            raise translate(exc, self.url, self.timeout) from None
        if self._closed:
            self._discard(conn)
        else:
            self._idle.append(conn)
        if kind == "#RETURN":
            return result
        if kind == "#ERROR" and isinstance(result, BaseException):
            raise result
        raise ShmstoreError(f"the server at {self.url} failed: {result}")

    def close(self) -> None:
        """Close every connection this store opened; later calls raise `StoreUnavailable`."""
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, set()
        self._idle = []
        for conn in conns:
            try:
                conn.close()
            except OSError:
                pass


# Every SharedStore of this process: a forked child drops their inherited connections
# (without a pid check on every call).
_STORES: weakref.WeakSet[SharedStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_STORES):
        store._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _rebuild(url: str, authkey: str, timeout: float, name: str | None) -> SharedStore:
    return SharedStore(url, authkey=authkey, timeout=timeout, name=name)
