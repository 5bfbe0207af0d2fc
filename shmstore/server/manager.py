"""The server process that owns the checkpoints: start, stop, addresses, authkey, watchdog.

`serve()` starts a ``multiprocessing.managers`` server (`TableServer`, one thread per
connection) in a child process that owns one `CheckpointTable`, and returns once that
process accepts connections.  The child is started with ``subprocess`` running
``python -c`` rather than ``BaseManager.start()``: spawn would re-import the user's
``__main__`` (a script without a ``__main__`` guard would start itself again) and fork
would copy the user's threads and locks.  The configuration, authkey included, goes over
the child's stdin, never its command line.

The child watches its stdin: when the process that started it dies — even by SIGKILL —
the pipe closes and the server stops within a fraction of a second.  A second check of
its parent pid covers forked children of the starter that still hold the pipe.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import resource
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing import connection, managers, process, util
from typing import IO, Any, cast

import psutil

from ..backends.table import CheckpointTable
from ..backends.wire import (
    FRAME_TIMEOUT,
    SERIALIZER,
    Address,
    Channel,
    parse_url,
    refuse,
    set_io_timeout,
    unpack,
)
from ..core.backend import BACKEND_OPS, CompleteAnswer, StatsDict
from ..core.errors import ConfigError, ShmstoreError, StoreUnavailable
from ..core.limits import Limits
from ..core.record import Record
from ..monitor.sampler import DEFAULT_HISTORY, DEFAULT_INTERVAL, MemoryMonitor

__all__ = ["StoreServer", "TableServer", "read_connection_file", "run_server", "serve"]

log = logging.getLogger("shmstore")

TABLE_IDENT = "table"
START_TIMEOUT = 60.0
WATCH_INTERVAL = 0.2
ENV_URL = "SHMSTORE_URL"
ENV_AUTHKEY = "SHMSTORE_AUTHKEY"
ENV_CONNECTION_FILE = "SHMSTORE_CONNECTION_FILE"
AUTHKEY_BYTES = 32
# After an accept() failure that may repeat at once (no spare descriptor, ENOBUFS ...):
# how long the accepter waits before the next try, so that it never spins.
ACCEPT_BACKOFF = 0.05
# How long a stopping server waits for its accepter thread to return.
ACCEPTER_JOIN = 5.0
# accept() errors about one peer (it hung up while queued): the next accept is fine.
_ACCEPT_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN})


def _without_frames(exc: BaseException) -> BaseException:
    """``exc`` without its traceback and chained exceptions, which the wire drops anyway.

    A traceback keeps the frames that raised alive, and with them their arguments: a
    refused 160 MiB batch would stay until the connection's next call.
    """
    exc.__traceback__ = None
    exc.__cause__ = exc.__context__ = None
    return exc


def _taking_records(table: CheckpointTable) -> dict[str, Callable[..., object]]:
    """The table's operations that take records, taking them as msgpack gave them.

    A record arrives as an array (a list); the table reads its fields by name, so each
    becomes a `Record` here (a wrong length is a TypeError, answered as an error).
    """
    make = Record._make

    def save(record: Sequence[object], expected_version: int | None = None) -> int:
        return table.save(make(record), expected_version)

    def save_many(records: Sequence[Sequence[object]]) -> list[int]:
        return table.save_many([make(r) for r in records])

    def save_new(records: Sequence[Sequence[object]]) -> list[int]:
        return table.save_new([make(r) for r in records])

    def complete(record: Sequence[object], token: str) -> CompleteAnswer:
        return table.complete(make(record), token)

    return {"save": save, "save_many": save_many, "save_new": save_new, "complete": complete}


class TableServer(managers.Server):
    """A stdlib manager server that serves one `CheckpointTable` under a fixed ident.

    Clients call the `Backend` operations (exactly `BACKEND_OPS`) with the stdlib's request
    format ``(ident, method, args, kwargs)``; the fixed ident saves the ``create`` round
    trip and the reference counting that a proxy per connection would need.
    """

    def __init__(self, address: Any, authkey: bytes, table: CheckpointTable, *,
                 interval: float = DEFAULT_INTERVAL,
                 history_size: int = DEFAULT_HISTORY) -> None:
        super().__init__({}, address, authkey, SERIALIZER)
        self.table = table
        self.monitor = MemoryMonitor(
            table.figures,
            interval=interval, history_size=history_size, trim=True,
        )
        # What a client may call: every `Backend` operation, the server's own where it
        # has one, else the table's (records rebuilt from the wire's arrays first).
        own: dict[str, Callable[..., object]] = {
            **_taking_records(table), "stats": self.stats,
            "register_client": self.monitor.register, "memory_history": self.monitor.history}
        self.ops: dict[str, Callable[..., object]] = {
            op: own[op] if op in own else getattr(table, op) for op in BACKEND_OPS}
        self.id_to_obj[TABLE_IDENT] = (table, frozenset(self.ops), None)  # type: ignore[assignment]
        self.stop_event = threading.Event()
        # Connections refused in the current episode, by reason (the accepter's own).
        self._refused: dict[str, int] = {}

    def stats(self) -> StatsDict:
        """The table's figures plus the server's memory: peak RSS and registered clients."""
        figures = self.table.stats()
        self.monitor.peak_rss = max(self.monitor.peak_rss, figures["server_peak_rss"])
        figures["server_peak_rss"] = self.monitor.peak_rss
        figures["clients"] = self.monitor.clients()
        return figures

    def handle_request(self, conn: Any) -> None:
        """Authenticate a new connection, then serve it (the stdlib's, made quiet).

        The stdlib answers a failed handshake with its traceback, which would tell a peer
        without the key the server's Python version and paths; here such a peer gets the
        handshake's failure message and a closed socket, nothing more.  After the
        handshake the only request served is ``accept_connection``.
        """
        key: bytes = self.authkey  # type: ignore[attr-defined]
        try:
            try:
                connection.deliver_challenge(conn, key)
                connection.answer_challenge(conn, key)
            except Exception as exc:  # wrong key, garbage, timeout, hang-up: all the same
                log.debug("refused a connection: %s: %s", type(exc).__name__, exc)
                return
            try:
                _ident, funcname, args, kwargs = conn.recv()
                if funcname != "accept_connection":
                    raise ShmstoreError(f"expected accept_connection, not {funcname!r:.80}")
            except Exception as exc:
                conn.send(("#ERROR", ShmstoreError(f"bad first request: {exc}")))
                return
            self.accept_connection(conn, *args, **kwargs)
        except Exception as exc:
            log.debug("connection ended: %s: %s", type(exc).__name__, exc)
        finally:
            conn.close()

    def accept_connection(self, c: Any, name: str) -> None:
        """Name this thread after the client, confirm, and serve its calls."""
        # The peer has authenticated: an idle connection may now wait for ever between
        # calls, but an answer it does not take still ends it (`FRAME_TIMEOUT`).
        set_io_timeout(c.fileno(), 0, send=FRAME_TIMEOUT)
        super().accept_connection(c, name)

    def serve_client(self, conn: Any) -> None:
        """Answer one authenticated client's table calls until it hangs up.

        Replaces the stdlib loop for speed, same request format: one read per request
        (`Channel`), a direct dispatch to the table's methods, nothing but `BACKEND_OPS`.
        A client that stops mid-message, or stops taking answers, for `FRAME_TIMEOUT`
        loses its connection and this thread ends: a frozen peer cannot pin it.
        """
        chan = Channel(conn._conn, frame_timeout=FRAME_TIMEOUT)
        stop = self.stop_event
        while not stop.is_set():
            try:
                data = chan.recv()
            except (EOFError, OSError):
                return  # the client went away; this thread ends with it
            msg = self._answer(data)
            # While this loop waits for the next request -- for ever, if the client is
            # idle -- it must hold nothing of this one: a large request is a buffer of
            # its own, and its decoded arguments are as big.
            del data
            try:
                chan.send_message(msg)
            except OSError:
                return
            del msg  # nor the answer (a loaded state) or the error

    def _answer(self, data: bytes | bytearray | memoryview) -> tuple[str, Any]:
        """Decode one request and run it; the answer or the error to send back."""
        try:
            _ident, op, args, kwargs = unpack(data)
            function = self.ops.get(op)
            if function is None:
                raise ShmstoreError(f"no such operation: {op!r}")
            return ("#RETURN", function(*args, **kwargs))
        except Exception as exc:  # the client re-raises it; the connection serves on
            return ("#ERROR", _without_frames(exc))

    def serve_forever(self) -> None:
        """Accept connections until `stop_event` is set, then return (no ``sys.exit``)."""
        from multiprocessing import process

        process.current_process()._manager_server = self  # type: ignore[attr-defined]
        accepter = threading.Thread(target=self.accepter, name="shmstore-accepter",
                                    daemon=True)
        accepter.start()
        self.stop_event.wait()
        # Let the accepter return (and give back its reserve descriptor) instead of
        # staying blocked in accept() on a listener about to be closed.
        self.listener.wake()  # type: ignore[attr-defined]
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
        listener = self.listener  # type: ignore[attr-defined]
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

    def _refuse_at_descriptor_limit(self, listener: Any, reserve: int | None,
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


def _keep_path_on_close(listener: Any) -> None:
    """Stop the stdlib's unix listener from unlinking its path when it closes.

    ``multiprocessing.connection.SocketListener`` removes its path on close (and at
    exit) whoever's socket is there by then; `_remove_own_socket` decides instead.
    """
    inner = getattr(getattr(listener, "_listener", None), "_listener", None)
    unlink = getattr(inner, "_unlink", None)
    if unlink is not None:
        unlink.cancel()


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

    Raises:
        ConfigError: the address is taken or unusable.
    """
    _raise_nofile_limit()
    if address.family == "AF_UNIX":
        _prepare_unix_path(address.target)
    try:
        server = TableServer(address.target, authkey, CheckpointTable(limits),
                             interval=monitor_interval, history_size=history_size)
    except OSError as exc:
        raise ConfigError(f"cannot listen at {address.url}: {exc.strerror or exc}",
                          value=address.url) from None
    if stop_event is not None:
        server.stop_event = stop_event
    socket_id = None
    if address.family == "AF_UNIX":
        socket_id = _file_id(address.target)
        _keep_path_on_close(server.listener)  # type: ignore[attr-defined]
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
        server.listener.close()  # type: ignore[attr-defined]
        if socket_id is not None:
            _remove_own_socket(address.target, socket_id)
        log.info("shmstore server %d stopped", os.getpid())


def _watch_starter(stop: threading.Event, fd: int, ppid: int) -> None:
    """Stop when the starter closes our stdin or dies (SIGKILL included)."""
    while not stop.is_set():
        try:
            ready, _, _ = select.select([fd], [], [], WATCH_INTERVAL)
            if ready and not os.read(fd, 4096):
                break
        except OSError:
            break
        if os.getppid() != ppid:
            break
    stop.set()


def _child_main() -> None:
    """Entry point of the server child process (see `serve`)."""
    # The starter owns our lifetime: a Ctrl-C in its terminal is for it, not for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # keep the ready line alone on the pipe
    config = json.loads(stdin.readline())
    stop = threading.Event()
    fd = stdin.fileno()
    threading.Thread(target=_watch_starter, args=(stop, fd, os.getppid()),
                     name="shmstore-watchdog", daemon=True).start()

    def ready(url: str) -> None:
        out.write(json.dumps({"url": url, "pid": os.getpid()}) + "\n")
        out.flush()

    try:
        run_server(parse_url(config["url"]), bytes.fromhex(config["authkey"]),
                   on_ready=ready, stop_event=stop, **config.get("options", {}))
    except ShmstoreError as exc:
        out.write(json.dumps({"error": str(exc), "type": type(exc).__name__}) + "\n")
        out.flush()
        os._exit(1)
    util._run_finalizers(0)  # type: ignore[attr-defined]
    os._exit(0)


_CHILD_CODE = "from shmstore.server.manager import _child_main; _child_main()"


def _coerce_authkey(authkey: bytes | str | None) -> bytes:
    if authkey is None:
        return secrets.token_bytes(AUTHKEY_BYTES)
    if isinstance(authkey, str):
        try:
            key = bytes.fromhex(authkey)
        except ValueError:
            raise ConfigError("an authkey given as str must be hex", value="<hidden>") from None
    elif isinstance(authkey, (bytes, bytearray)):
        key = bytes(authkey)
    else:
        raise ConfigError(f"authkey must be bytes or a hex str, not {type(authkey).__name__}",
                          value="<hidden>")
    if not key:
        raise ConfigError("authkey must not be empty", value="<hidden>")
    return key


def write_connection_file(path: str, url: str, authkey: bytes, pid: int) -> None:
    """Write ``{"url", "authkey" (hex), "pid"}`` to ``path``, readable by the owner only.

    The file is written to a fresh temporary file beside ``path`` (``O_EXCL|O_NOFOLLOW``,
    mode 0600) and renamed over it: a symlink or someone else's file at ``path`` is
    replaced, never followed or truncated.

    Raises:
        ConfigError: the directory is missing or not writable.
    """
    directory = os.path.dirname(os.path.abspath(path))
    data = json.dumps({"url": url, "authkey": authkey.hex(), "pid": pid}).encode()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    tmp = ""
    try:
        for _ in range(100):  # a name taken by someone else: O_EXCL refuses it, try another
            tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}")
            try:
                fd = os.open(tmp, flags, 0o600)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"no free temporary name in {directory}")
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, path)  # replaces a symlink itself, never its target
    except OSError as exc:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, FileNotFoundError):
            why = f"its directory {directory!r} does not exist; create it (mode 0700)"
        else:
            why = f"{exc.strerror or exc}; check the permissions of {directory!r}"
        raise ConfigError(f"cannot write connection file {path!r}: {why} or choose another "
                          "path", value=path) from None


def _connection_file_error(path: str, why: str) -> ConfigError:
    return ConfigError(
        f"cannot read connection file {path!r} ({why}); it is written by "
        "`shmstore serve --connection-file PATH`",
        value=path,
    )


def read_connection_file(path: str) -> tuple[str, bytes]:
    """Read the URL and authkey from a connection file.

    A file that others can read logs a warning (its key is no longer secret); a file
    owned by another user is refused, since whoever owns it chooses the server this
    process trusts.

    Raises:
        ConfigError: the file is missing, unreadable, owned by another user or not a
            connection file.
        StoreUnavailable: the server process that wrote it (its ``pid``) is not running.
    """
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            raw = fh.read()
    except OSError as exc:
        raise _connection_file_error(path, str(exc)) from None
    if st.st_uid != os.getuid():
        raise ConfigError(
            f"connection file {path!r} is owned by uid {st.st_uid}, not by this user "
            f"(uid {os.getuid()}): whoever owns it picks the server you trust; use a file "
            "you wrote with `shmstore serve --connection-file PATH`",
            value=path,
        )
    if st.st_mode & 0o077:
        log.warning("connection file %r is readable by others (mode %04o): its authkey is "
                    "not secret; `chmod 600` it, or restart the server to write a new one",
                    path, stat.S_IMODE(st.st_mode))
    try:
        data = json.loads(raw)
        url, key, pid = str(data["url"]), bytes.fromhex(data["authkey"]), data.get("pid")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _connection_file_error(path, f"{type(exc).__name__}: {exc}") from None
    # Only a unix socket's server is surely on this machine (a TCP one may be elsewhere).
    if url.startswith("unix:") and isinstance(pid, int) and pid > 0 \
            and not psutil.pid_exists(pid):
        raise StoreUnavailable(
            f"the server (pid {pid}) that wrote connection file {path!r} is not running; "
            "start one again (`shmstore serve --connection-file PATH`)",
            address=url,
        )
    return url, key


class StoreServer:
    """A running server started by `serve`; stop it with `shutdown` or ``with``.

    Attributes:
        url: where clients connect (``unix:///...`` or ``tcp://host:port``).
        authkey: the key clients need (bytes).
        pid: the server process id.
    """

    def __init__(self, proc: subprocess.Popen[bytes], url: str, authkey: bytes,
                 private_dir: str | None, exported: dict[str, str | None] | None,
                 connection_file: str | None) -> None:
        self._proc = proc
        self.url = url
        self.authkey = authkey
        self.pid = proc.pid
        self._private_dir = private_dir
        self._exported = exported
        self._connection_file = connection_file
        self._owner = os.getpid()
        self._stopped = False
        atexit.register(self.shutdown)

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"<StoreServer {self.url} pid={self.pid} {state}>"

    def connect(self, **options: Any) -> Any:
        """A `SharedStore` connected to this server (options as for `connect`)."""
        from ..backends.shared import SharedStore

        return SharedStore(self.url, authkey=self.authkey, **options)

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return not self._stopped and self._proc.poll() is None

    def shutdown(self, *, timeout: float = 2.0) -> None:
        """Stop the server: ask, then terminate, then kill.  Calling it again does nothing."""
        if self._stopped or os.getpid() != self._owner:
            return
        self._stopped = True
        atexit.unregister(self.shutdown)
        proc = self._proc
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # the ask: the watchdog sees EOF
        except OSError:
            pass
        for action in (None, proc.terminate, proc.kill):
            if action is not None and proc.poll() is None:
                action()
            try:
                proc.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        if proc.stdout is not None:
            proc.stdout.close()
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
        if self._connection_file is not None:
            try:
                os.unlink(self._connection_file)
            except FileNotFoundError:
                pass
        if self._exported is not None:
            for key, old in self._exported.items():
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old

    def __enter__(self) -> StoreServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _discard(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server child that failed to start (or whose start failed), close its pipes."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # a ready server sees EOF and removes its socket
    try:
        proc.wait(2.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


def _read_ready_line(proc: subprocess.Popen[bytes], stdout: IO[bytes], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    buf = b""
    fd = stdout.fileno()
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StoreUnavailable(f"the server did not start within {timeout} s",
                                   address="")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                code = proc.wait()
                raise StoreUnavailable(
                    f"the server process exited with code {code} before it was ready "
                    "(its error is on stderr)",
                    address="",
                )
            buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


def serve(
    address: str | None = None,
    *,
    authkey: bytes | str | None = None,
    export: bool = True,
    allow_remote: bool = False,
    connection_file: str | None = None,
    monitor_interval: float = DEFAULT_INTERVAL,
    history_size: int = DEFAULT_HISTORY,
    limits: Limits | dict[str, Any] | None = None,
) -> StoreServer:
    """Start a server process that owns the checkpoints; return once it accepts connections.

    Parameters:
        address: ``unix:///path/to.sock`` or ``tcp://127.0.0.1:PORT`` (port 0 picks one).
            Default: a socket in a fresh private (0700) directory, removed at shutdown.
        authkey: bytes or hex; default 32 random bytes.
        export: set ``SHMSTORE_URL`` and ``SHMSTORE_AUTHKEY`` (hex) in ``os.environ`` while
            the server runs, so child processes can ``shmstore.connect()`` with no arguments.
        allow_remote: permit a TCP host other than loopback.
        connection_file: also write ``{"url", "authkey", "pid"}`` there (mode 0600).
        monitor_interval: seconds between the server's memory samples (psutil).
        history_size: how many memory samples the server keeps.
        limits: what the store may hold and what happens when a save would not fit
            (`Limits`, or a dict of its fields); default: only ``max_checkpoint_bytes``.

    Raises:
        ConfigError: a bad address or authkey, or the address is taken.
        StoreUnavailable: the server process failed to start.

    Example:
        >>> with shmstore.serve() as server:
        ...     store = shmstore.connect()   # from the exported environment
    """
    if getattr(process.current_process(), "_inheriting", False):
        # What multiprocessing's spawn checks too: this process is a spawned child still
        # importing the parent's main module, so the parent's top level runs again here.
        raise ConfigError(
            "serve() was called while a spawned child process re-imports the main module: "
            "every child would start a server of its own. Put the code that starts the "
            'server (and the processes) under `if __name__ == "__main__":` in your script',
            value="__main__",
        )
    key = _coerce_authkey(authkey)
    MemoryMonitor(lambda: (0, 0), interval=monitor_interval, history_size=history_size)  # checks
    options = {"monitor_interval": monitor_interval, "history_size": history_size,
               "limits": Limits.coerce(limits).to_dict()}
    private_dir = None
    if address is None:
        private_dir = tempfile.mkdtemp(prefix="shmstore-")  # mode 0700
        parsed = parse_url(f"unix://{private_dir}/store.sock")
    else:
        parsed = parse_url(address)
    if not parsed.is_loopback and not allow_remote:
        raise ConfigError(
            f"{parsed.url} is not a loopback address; pass allow_remote=True (and keep the "
            "authkey secret) to serve other machines",
            value=parsed.url,
        )
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD_CODE],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        config = {"url": parsed.url, "authkey": key.hex(), "options": options}
        proc.stdin.write(json.dumps(config).encode() + b"\n")
        proc.stdin.flush()
        reply = _read_ready_line(proc, proc.stdout, START_TIMEOUT)
        if "error" in reply:
            raise ConfigError(reply["error"], value=parsed.url)
        url = reply["url"]
        if connection_file is not None:  # before exporting: a failure leaves nothing behind
            write_connection_file(connection_file, url, key, proc.pid)
    except BaseException:
        _discard(proc)
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)
        raise
    exported = None
    if export:
        exported = {ENV_URL: os.environ.get(ENV_URL), ENV_AUTHKEY: os.environ.get(ENV_AUTHKEY)}
        os.environ[ENV_URL] = url
        os.environ[ENV_AUTHKEY] = key.hex()
    server = StoreServer(proc, url, key, private_dir, exported, connection_file)
    log.info("started shmstore server %d at %s", proc.pid, url)
    return server
