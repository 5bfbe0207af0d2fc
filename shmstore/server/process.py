"""Starting and stopping the server process: `serve`, `StoreServer`, the child's main.

`serve()` starts a server child that runs `run_server` (`server.manager`) and returns
once it accepts connections.  The child is started with ``subprocess`` running
``python -c`` rather than ``BaseManager.start()``: spawn would re-import the user's
``__main__`` (a script without a ``__main__`` guard would start itself again) and fork
would copy the user's threads and locks.  The configuration, authkey included, goes over
the child's stdin, never its command line.  The child imports only what it serves: this
module, then `server.manager` and what it needs; what only the starter uses (subprocess,
shutil, tempfile) is imported in the functions that use it.

The child watches its stdin: when the process that started it dies — even by SIGKILL —
the pipe closes and the server stops within a fraction of a second.  A second check of
its parent pid covers forked children of the starter that still hold the pipe.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import select
import signal
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Any

from ..core.config import (
    ENV_AUTHKEY,
    ENV_URL,
    coerce_authkey,
    parse_url,
    write_connection_file,
)
from ..core.errors import ConfigError, ShmstoreError, StoreUnavailable
from ..core.limits import Limits
from ..core.segment import available as segment_available
from ..monitor.sampler import DEFAULT_HISTORY, DEFAULT_INTERVAL, MemoryMonitor

if TYPE_CHECKING:
    import subprocess

    from ..backends.shared import SharedStore

__all__ = ["StoreServer", "serve"]

log = logging.getLogger("shmstore")

START_TIMEOUT = 60.0
WATCH_INTERVAL = 0.2


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

    from .manager import run_server  # only the child serves: serve() does not import it

    try:
        run_server(parse_url(config["url"]), bytes.fromhex(config["authkey"]),
                   on_ready=ready, stop_event=stop, **config.get("options", {}))
    except ShmstoreError as exc:
        out.write(json.dumps({"error": str(exc), "type": type(exc).__name__}) + "\n")
        out.flush()
        os._exit(1)
    os._exit(0)


_CHILD_CODE = "from shmstore.server.process import _child_main; _child_main()"


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

    def connect(self, **options: Any) -> SharedStore:
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
        import shutil  # starter only (see the module doc), like subprocess below
        import subprocess

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
    import subprocess  # starter only (see the module doc)

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
    data_plane: bool = True,
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
            (`Limits`, or a dict of its fields); default: only ``max_checkpoint_bytes``
            (64 MiB; 4 GiB with the data plane).
        data_plane: on a unix socket, states of at least a client's
            ``data_plane_threshold`` travel as sealed memory segments, never through the
            socket or the server's heap, and loads map them (zero-copy numpy arrays);
            False: every state is bytes on the socket.  TCP servers have no data plane.

    Raises:
        ConfigError: a bad address or authkey, or the address is taken.
        StoreUnavailable: the server process failed to start.

    Example:
        >>> with shmstore.serve() as server:
        ...     store = shmstore.connect()   # from the exported environment
    """
    # Starter only (see the module doc): the child never calls serve().
    import shutil
    import subprocess
    import tempfile
    from multiprocessing import process

    if getattr(process.current_process(), "_inheriting", False):
        # What multiprocessing's spawn checks too: this process is a spawned child still
        # importing the parent's main module, so the parent's top level runs again here.
        raise ConfigError(
            "serve() was called while a spawned child process re-imports the main module: "
            "every child would start a server of its own. Put the code that starts the "
            'server (and the processes) under `if __name__ == "__main__":` in your script',
            value="__main__",
        )
    key = coerce_authkey(authkey)
    MemoryMonitor(lambda: (0, 0), interval=monitor_interval, history_size=history_size)  # checks
    if address is None:
        parsed = parse_url("unix:///store.sock")  # in a private directory, made below
    else:
        parsed = parse_url(address)
    plane = bool(data_plane) and parsed.family == "AF_UNIX" and segment_available()
    options = {"monitor_interval": monitor_interval, "history_size": history_size,
               "limits": Limits.coerce(limits, data_plane=plane).to_dict(),
               "data_plane": plane}
    private_dir = None
    if address is None:
        private_dir = tempfile.mkdtemp(prefix="shmstore-")  # mode 0700
        parsed = parse_url(f"unix://{private_dir}/store.sock")
    if not parsed.is_loopback and not allow_remote:
        raise ConfigError(
            f"{parsed.url} is not a loopback address; pass allow_remote=True (and keep the "
            "authkey secret) to serve other machines",
            value=parsed.url,
        )
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
