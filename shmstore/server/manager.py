"""The server that owns the checkpoints: `StoreManager`, `TableServer`, `run_server`.

`TableServer` is a ``multiprocessing.managers.Server`` that serves one `CheckpointTable`;
`StoreManager.get_server` builds it, and `run_server` runs it in the calling process (the
server child of `serve`, see `server.process`, or ``shmstore serve``).  Of the stdlib
server it keeps the shape (`serve_forever`, `accepter`, `handle_request`,
`accept_connection`, `serve_client`) and its handshake; it replaces the parts that would
pickle, leak a traceback to an unauthenticated peer, die with the first thread that
cannot start, or cost a lookup per call.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import socket
import stat
import threading
from collections.abc import Callable, Sequence
from multiprocessing import connection, managers, process
from typing import Any, cast

from ..backends.table import CheckpointTable
from ..backends.wire import (
    FRAME_TIMEOUT,
    SERVER_KEEP,
    Channel,
    WireListener,
    refuse,
    set_io_timeout,
)
from ..core import segment
from ..core.backend import BACKEND_OPS, CompleteAnswer, StatsDict
from ..core.config import Address, parse_url
from ..core.errors import ConfigError, ShmstoreError
from ..core.limits import Limits
from ..core.record import Record
from ..core.segment import Segment
from ..monitor.sampler import (
    DEFAULT_HISTORY,
    DEFAULT_INTERVAL,
    MemoryMonitor,
    cap_malloc_arenas,
)

__all__ = ["StoreManager", "TableServer", "run_server"]

log = logging.getLogger("shmstore")

# After an accept() failure that may repeat at once (no spare descriptor, ENOBUFS ...):
# how long the accepter waits before the next try, so that it never spins.
ACCEPT_BACKOFF = 0.05
# How long a stopping server waits for its accepter thread to return.
ACCEPTER_JOIN = 5.0
# accept() errors about one peer (it hung up while queued): the next accept is fine.
_ACCEPT_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN})
# The server's loopback default when a StoreManager is given no address: a free port.
_DEFAULT_ADDRESS = "tcp://127.0.0.1:0"


def _without_frames(exc: BaseException) -> BaseException:
    """``exc`` without its traceback and chained exceptions, which the wire drops anyway.

    A traceback keeps the frames that raised alive, and with them their arguments: a
    refused 160 MiB batch would stay until the connection's next call.
    """
    exc.__traceback__ = None
    exc.__cause__ = exc.__context__ = None
    return exc


def _adopt(fd: int, size: int) -> Segment | bytes:
    """A descriptor a client sent: a checked, sealed segment; or, when this process is
    near its descriptor limit, the segment's bytes (the record then holds those)."""
    seg = segment.adopt(fd, size)
    if segment.room_for_another():
        return seg
    try:
        return seg.read()
    finally:
        seg.close()


def _taking_records(table: CheckpointTable) -> dict[str, Callable[..., object]]:
    """The table's operations that take records, taking them as msgpack gave them.

    A record arrives as an array (a list); the table reads its fields by name, so each
    becomes a `Record` here (a wrong length is a TypeError, answered as an error).
    """
    make = Record._make
    new, fields, table_save = tuple.__new__, len(Record._fields), table.save

    def save(record: Sequence[object], expected_version: int | None = None) -> int:
        # The hot path, inlined: `Record._make` is this plus a call frame.
        built = new(Record, record)
        if len(built) != fields:
            raise TypeError(f"a record has {fields} fields, not {len(built)}")
        return table_save(built, expected_version)

    def save_many(records: Sequence[Sequence[object]]) -> list[int]:
        return table.save_many([make(r) for r in records])

    def save_new(records: Sequence[Sequence[object]]) -> list[int]:
        return table.save_new([make(r) for r in records])

    def complete(record: Sequence[object], token: str) -> CompleteAnswer:
        return table.complete(make(record), token)

    return {"save": save, "save_many": save_many, "save_new": save_new, "complete": complete}


class TableServer(managers.Server):
    """A stdlib manager server that serves one `CheckpointTable`, msgpack only.

    A request is ``(operation, arguments)``; the operations are exactly `BACKEND_OPS`
    (the `Backend` protocol's methods): the table's, and the server's own (``stats``,
    ``register_client``, ``memory_history``).  There is no object ident: one table is
    served, so there is no ``create`` round trip and no proxy reference counting.

    ``managers.Server.__init__`` is not called: it binds a listener chosen by serializer
    name from a module-global registry (which would have to be patched to get a msgpack
    one) and sets up the proxy bookkeeping (``id_to_obj``, reference counts) for objects
    this server never creates.  Its proxy methods (``create``, ``incref`` ...) are
    unreachable: a client can call only what `ops` names.
    """

    def __init__(self, address: Address, authkey: bytes, table: CheckpointTable, *,
                 interval: float = DEFAULT_INTERVAL,
                 history_size: int = DEFAULT_HISTORY, data_plane: bool = False) -> None:
        self.listener = WireListener(address)
        # Whether clients may pass memory segments (unix sockets only: SCM_RIGHTS).
        self.data_plane = bool(data_plane and address.family == "AF_UNIX"
                               and segment.available())
        self.address = self.listener.address
        self.authkey = authkey
        self.table = table
        self.monitor = MemoryMonitor(
            table.figures, largest=table.largest,
            interval=interval, history_size=history_size, trim=True,
        )
        # What a client may call: every `Backend` operation, the server's own where it
        # has one, else the table's (records rebuilt from the wire's arrays first).
        own: dict[str, Callable[..., object]] = {
            **_taking_records(table), "stats": self.stats,
            "register_client": self.monitor.register, "memory_history": self.monitor.history}
        self.ops: dict[str, Callable[..., object]] = {
            op: own[op] if op in own else getattr(table, op) for op in BACKEND_OPS}
        self.stop_event = threading.Event()
        #: glibc's malloc arena cap in force (`cap_malloc_arenas`; None: not capped).
        self.malloc_arenas: int | None = None
        # Connections refused in the current episode, by reason (the accepter's own).
        self._refused: dict[str, int] = {}

    def stats(self) -> StatsDict:
        """The table's figures plus the server's memory: peak RSS and registered clients."""
        figures = self.table.stats()
        self.monitor.peak_rss = max(self.monitor.peak_rss, figures["server_peak_rss"])
        figures["server_peak_rss"] = self.monitor.peak_rss
        figures["clients"] = self.monitor.clients()
        figures["segments"], figures["segment_bytes"] = segment.held()
        figures["malloc_arenas"] = self.malloc_arenas
        return figures

    def handle_request(self, conn: connection.Connection) -> None:
        """Authenticate a new connection, then serve it (the stdlib's, made quiet).

        The stdlib answers a failed handshake with its traceback, which would tell a peer
        without the key the server's Python version and paths; here such a peer gets the
        handshake's failure message and a closed socket, nothing more.  After the
        handshake the only request served is ``("accept_connection", [name, data_plane])``;
        the answer says whether this connection passes memory segments' descriptors.
        """
        try:
            try:
                connection.deliver_challenge(conn, self.authkey)
                connection.answer_challenge(conn, self.authkey)
            except Exception as exc:  # wrong key, garbage, timeout, hang-up: all the same
                log.debug("refused a connection: %s: %s", type(exc).__name__, exc)
                return
            try:
                funcname, args = conn.recv()
                if funcname != "accept_connection" or not 1 <= len(args) <= 2:
                    raise ShmstoreError(f"expected accept_connection, not {funcname!r:.80}")
                name, wants = args[0], len(args) == 2 and args[1] is True
            except Exception as exc:
                conn.send(("#ERROR", ShmstoreError(f"bad first request: {exc}")))
                return
            # The peer has authenticated: an idle connection may now wait for ever between
            # calls, but an answer it does not take still ends it (`FRAME_TIMEOUT`).
            set_io_timeout(conn.fileno(), 0, send=FRAME_TIMEOUT)
            self.accept_connection(conn, str(name), wants and self.data_plane)
        except Exception as exc:
            log.debug("connection ended: %s: %s", type(exc).__name__, exc)
        finally:
            conn.close()

    def accept_connection(self, c: connection.Connection, name: str,
                          passes_fds: bool = False) -> None:
        """Name the thread, say whether descriptors pass, serve (the stdlib's, plus that)."""
        threading.current_thread().name = name
        c.send(("#RETURN", passes_fds))
        self.serve_client(c, passes_fds)

    def serve_client(self, conn: connection.Connection, passes_fds: bool = False) -> None:
        """Answer one authenticated client's calls until it hangs up.

        Replaces the stdlib loop for speed: one read per request (`Channel`), a direct
        dispatch to the table's methods, nothing but `ops`.  A client that stops
        mid-message, or stops taking answers, for `FRAME_TIMEOUT` loses its connection
        and this thread ends: a frozen peer cannot pin it.
        """
        chan = Channel(conn, frame_timeout=FRAME_TIMEOUT, passes_fds=passes_fds,
                       adopt=_adopt, keep=SERVER_KEEP)
        stop = self.stop_event
        while not stop.is_set():
            try:
                data = chan.recv()
            except (EOFError, OSError):
                return  # the client went away; this thread ends with it
            msg = self._answer(chan, data)
            # While this loop waits for the next request -- for ever, if the client is
            # idle -- it must hold nothing of this one: a large request is a buffer of
            # its own, and its decoded arguments are as big.
            del data
            try:
                # Requests a client pipelined, already here: their answers go together.
                chan.send_message(msg, more=chan.has_message())
            except OSError:
                return
            del msg  # nor the answer (a loaded state) or the error

    def _answer(self, chan: Channel, data: bytes | bytearray | memoryview) -> tuple[str, Any]:
        """Decode one request and run it; the answer or the error to send back."""
        try:
            op, args = chan.unpack(data)
            function = self.ops.get(op)
            if function is None:
                raise ShmstoreError(f"no such operation: {op!r:.80}")
            return ("#RETURN", function(*args))
        except Exception as exc:  # the client re-raises it; the connection serves on
            return ("#ERROR", _without_frames(exc))

    def serve_forever(self) -> None:
        """Accept connections until `stop_event` is set, then return.

        The stdlib's makes a new stop event (losing the one `run_server` was given),
        polls it once a second and ends with ``sys.exit``.
        """
        accepter = threading.Thread(target=self.accepter, name="shmstore-accepter",
                                    daemon=True)
        accepter.start()
        self.stop_event.wait()
        # Let the accepter return (and give back its reserve descriptor) instead of
        # staying blocked in accept() on a listener about to be closed.
        self.listener.wake()
        accepter.join(ACCEPTER_JOIN)

    def accepter(self) -> None:
        """Accept connections and start a thread for each, until the server stops.

        Replaces the stdlib's, whose thread dies the first time a thread cannot start
        (every later client then waits out its timeout) and which spins at the descriptor
        limit.  Here a connection that cannot be served gets a `wire.REFUSED` frame
        naming why and is closed, one warning is logged per episode (and one info line
        when it ends), and accepting goes on.  A spare descriptor (/dev/null) is kept
        open so that, at the limit, it can be given up to accept and refuse the waiting
        peer instead of leaving it hanging.
        """
        listener = self.listener
        reserve = _open_reserve()
        try:
            while not self.stop_event.is_set():
                try:
                    conn = listener.accept()
                except OSError as exc:
                    if self.stop_event.is_set():
                        return
                    if exc.errno in (errno.EMFILE, errno.ENFILE):
                        reserve = self._refuse_at_descriptor_limit(listener, reserve, exc)
                    elif exc.errno not in _ACCEPT_TRANSIENT:
                        self._refusing("accept", f"accept() failed: {exc}")
                        self.stop_event.wait(ACCEPT_BACKOFF)  # not a busy loop
                    continue
                self._served("descriptors")
                self._served("accept")
                try:
                    threading.Thread(target=self.handle_request, args=(conn,),
                                     daemon=True).start()
                except (RuntimeError, MemoryError) as exc:  # "can't start new thread"
                    self._refusing("threads", f"cannot start a thread for a connection: "
                                   f"{exc}; refusing new connections until one starts")
                    refuse(conn, b"threads")
                    continue
                self._served("threads")
        finally:
            if reserve is not None:
                os.close(reserve)

    def _refuse_at_descriptor_limit(self, listener: WireListener, reserve: int | None,
                                    exc: OSError) -> int | None:
        """At EMFILE/ENFILE: free the reserve, accept and refuse one peer, take it back."""
        self._refusing("descriptors", f"out of file descriptors ({exc.strerror}); "
                       "refusing new connections until some close (raise ulimit -n)")
        if reserve is None:  # taken by another thread last time: try again, slowly
            reserve = _open_reserve()
            self.stop_event.wait(ACCEPT_BACKOFF)
            return reserve
        os.close(reserve)
        try:
            refuse(listener.accept(), b"descriptors")
        except OSError:
            self.stop_event.wait(ACCEPT_BACKOFF)
        return _open_reserve()

    def _refusing(self, reason: str, message: str) -> None:
        """Count a refused connection; warn at the first of an episode only."""
        count = self._refused.get(reason, 0)
        if not count:
            log.warning("shmstore server %d: %s", os.getpid(), message)
        self._refused[reason] = count + 1

    def _served(self, reason: str) -> None:
        """End an episode of refusals for ``reason``, if one was going on."""
        count = self._refused.pop(reason, 0)
        if count:
            log.info("shmstore server %d: serving new connections again after "
                     "refusing %d (%s)", os.getpid(), count, reason)


def _open_reserve() -> int | None:
    """A descriptor to give up at the limit (see `TableServer.accepter`), or None."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class StoreManager(managers.BaseManager):
    """The manager of one checkpoint table: `get_server` builds the `TableServer`.

    Only `get_server` is used (by `run_server`, in the process that serves).  `serve`
    starts that process itself with ``subprocess`` -- ``start`` would spawn (re-importing
    the user's ``__main__``) or fork (copying the user's threads and locks) -- and clients
    use `shmstore.connect`, not stdlib proxies, so `start` and `connect` refuse.

    Parameters:
        address: where the server listens (an `Address` or its URL); default a free
            loopback TCP port.
        authkey: the key clients must prove they know; default this process's authkey.
        limits: what the table may hold (`Limits` or its dict).
        monitor_interval: seconds between the server's memory samples.
        history_size: how many memory samples the server keeps.
        data_plane: let clients pass large states as sealed memory segments (unix
            sockets only; see `core.segment`).
    """

    def __init__(self, address: Address | str | None = None, authkey: bytes | None = None,
                 *, limits: Limits | dict[str, Any] | None = None,
                 monitor_interval: float = DEFAULT_INTERVAL,
                 history_size: int = DEFAULT_HISTORY, data_plane: bool = False) -> None:
        where = address if isinstance(address, Address) else parse_url(address or
                                                                       _DEFAULT_ADDRESS)
        # No serializer: this manager never opens a stdlib connection (the default one,
        # pickle, is named only because the base constructor looks one up).
        super().__init__(where.target, authkey)
        self._where = where
        # The key as given (or the process's), kept apart from the base's private copy.
        self._key = bytes(authkey if authkey is not None else process.current_process().authkey)
        self._limits = limits  # checked by the table, as every setting by its user
        self._monitor_interval = monitor_interval
        self._history_size = history_size
        self._data_plane = data_plane

    def get_server(self) -> TableServer:
        """A new server for a new table, listening at this manager's address.

        Raises:
            OSError: the address cannot be bound.
        """
        return TableServer(self._where, self._key, CheckpointTable(self._limits),
                           interval=self._monitor_interval, history_size=self._history_size,
                           data_plane=self._data_plane)

    def start(self, initializer: Any = None, initargs: Any = ()) -> None:
        raise ShmstoreError("StoreManager.start is not supported: use shmstore.serve()")

    def connect(self) -> None:
        raise ShmstoreError("StoreManager.connect is not supported: use shmstore.connect()")


def _prepare_unix_path(path: str) -> None:
    """Replace a stale socket left by a killed server; refuse a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise ConfigError(f"the directory {parent!r} of the socket does not exist",
                              value=path) from None
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path!r} exists and is not a socket; choose another path",
                          value=path)
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a killed server's leftover
        return
    finally:
        probe.close()
    raise ConfigError(f"a server is already listening at unix://{path}", value=path)


def _raise_nofile_limit() -> None:
    """Raise this process's soft descriptor limit to its hard limit.

    Each connection costs the server one descriptor (and one thread); a soft limit of
    1024, common by default, would refuse the 1000th client while the hard limit allows
    far more.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # e.g. an unlimited hard limit the kernel caps
        log.debug("kept the descriptor limit at %s (raising it to %s failed: %s)",
                  soft, hard, exc)
        return
    log.debug("raised the descriptor limit from %s to %s", soft, hard)


def _file_id(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of ``path`` itself (a symlink is not followed), or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _remove_own_socket(path: str, socket_id: tuple[int, int] | None) -> None:
    """Unlink the socket at ``path`` only if it is still the one this server bound.

    Someone may have removed ours and another server bound the same path since: its
    socket must survive our shutdown.
    """
    if socket_id is None or _file_id(path) != socket_id:
        log.debug("left %s alone: it is no longer this server's socket", path)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def run_server(
    address: Address,
    authkey: bytes,
    *,
    on_ready: Any = None,
    stop_event: threading.Event | None = None,
    monitor_interval: float = DEFAULT_INTERVAL,
    history_size: int = DEFAULT_HISTORY,
    limits: Limits | dict[str, Any] | None = None,
    data_plane: bool = True,
) -> None:
    """Serve a new table at ``address`` in this process until stopped.

    Parameters:
        address: where to listen; TCP port 0 picks a free port.
        authkey: the key clients must prove they know.
        on_ready: called with the URL once connections are accepted.
        stop_event: set it to stop the server (SIGTERM and SIGINT set it too when this
            runs in the main thread).
        monitor_interval: seconds between memory samples.
        history_size: how many memory samples are kept.
        limits: what the store may hold (`Limits` or its dict).
        data_plane: take and give large states as sealed memory segments on a unix
            socket (ignored on TCP).

    Raises:
        ConfigError: the address is taken or unusable.
    """
    _raise_nofile_limit()
    arenas = cap_malloc_arenas()  # before any thread of the server starts
    if address.family == "AF_UNIX":
        _prepare_unix_path(address.target)
    manager = StoreManager(address, authkey, limits=limits,
                           monitor_interval=monitor_interval, history_size=history_size,
                           data_plane=data_plane)
    try:
        server = manager.get_server()
    except OSError as exc:
        raise ConfigError(f"cannot listen at {address.url}: {exc.strerror or exc}",
                          value=address.url) from None
    if stop_event is not None:
        server.stop_event = stop_event
    server.malloc_arenas = arenas
    socket_id = None
    if address.family == "AF_UNIX":
        socket_id = _file_id(address.target)
        os.chmod(address.target, 0o600)
        url = address.url
    else:
        host, port = cast("tuple[str, int]", server.address)
        url = f"tcp://{host}:{port}"
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: server.stop_event.set())
    log.info("shmstore server %d listening at %s", os.getpid(), url)
    if on_ready is not None:
        on_ready(url)
    server.monitor.start()
    try:
        server.serve_forever()
    finally:
        server.monitor.stop()
        server.listener.close()
        if socket_id is not None:
            _remove_own_socket(address.target, socket_id)
        log.info("shmstore server %d stopped", os.getpid())
