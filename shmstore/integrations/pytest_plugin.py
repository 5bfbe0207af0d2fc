"""pytest plugin: one checkpoint store shared by every process of a test run.

Installing shmstore registers this module through the ``pytest11`` entry point (disable
it with ``-p no:shmstore``).  It adds the session fixtures ``checkpoint_store`` and
``checkpoint_server`` and the options ``--shmstore-url`` and ``--shmstore-report``.

Who owns the server (one helper, `_role`, tells the three cases apart):

* **single** — no pytest-xdist, or ``-n 0``: the session process starts the server the
  first time a test asks for a fixture, and stops it in ``pytest_unconfigure``.
* **controller** — the xdist controller owns the server, but does not start it up
  front: a run whose tests never ask for the store must not pay for a process.  In
  ``pytest_configure_node`` it hands each worker a *launch plan* through ``workerinput``:
  the path of a unix socket in a private (0700) directory, and the run's authkey.  A
  thread of the controller listens on that socket; the first worker that needs the store
  asks (HMAC handshake with the authkey), the controller starts the server — once, under
  a lock — and every asking worker gets its URL.  The server is a child of the
  controller, which outlives every worker: it is stopped in the controller's
  ``pytest_unconfigure``, after the last worker finished, whether workers crashed or the
  run was interrupted (pytest unconfigures on KeyboardInterrupt too); if the controller
  itself is killed, the server's watchdog sees its stdin close and stops it.
  The alternative — the first worker starts the server under a file lock — was rejected:
  that worker may finish or crash while others still use the store.
* **worker** — asks the controller through the plan, then connects.

With ``--shmstore-url`` nobody starts or stops anything: every process connects to that
server; the authkey comes from ``SHMSTORE_AUTHKEY`` or ``SHMSTORE_CONNECTION_FILE``
(never from the command line, where other users could read it).

The module is imported by every pytest run in an environment where shmstore is
installed, so it imports nothing heavy at import time: the client, the server, msgpack
and psutil are imported when a fixture is first used (or a report is asked for).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import select
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from ..core.stats import StoreStats
    from ..core.store import BaseStore
    from ..server.process import StoreServer

__all__ = ["SessionServer", "checkpoint_server", "checkpoint_store"]

log = logging.getLogger("shmstore")

SINGLE, CONTROLLER, WORKER = "single", "controller", "worker"
PLAN_SOCKET = "shmstore_launch"      # workerinput key: the controller's launch socket
PLAN_AUTHKEY = "shmstore_authkey"    # workerinput key: the run's authkey (hex)
PLAN_RUN = "shmstore_run"            # workerinput key: the run's id (--shmstore-memory)
OUTPUT_KEY = "shmstore"              # workeroutput key: the worker's figures
HANDSHAKE_TIMEOUT = 10.0
LAUNCH_TIMEOUT = 70.0                # above server.process.START_TIMEOUT: the start may take that
_STATE = pytest.StashKey["_RunStore"]()

# What the report shows: (figure, label, kind) where kind "bytes" is shown human-readable.
# Add a row here when stats() or the workers' figures gain one (e.g. the memory monitor).
SERVER_FIGURES = (
    ("checkpoints", "checkpoints", "count"),
    ("executions", "executions", "count"),
    ("payload_bytes", "payload", "bytes"),
    ("server_rss", "server RSS", "bytes"),
    ("server_peak_rss", "server peak RSS", "bytes"),
)
WORKER_FIGURES = (
    ("rss", "RSS", "bytes"),
    ("peak_rss", "peak RSS", "bytes"),
)


def _role(config: pytest.Config) -> str:
    """`WORKER` in an xdist worker, `CONTROLLER` when distributing to workers, else `SINGLE`."""
    if hasattr(config, "workerinput"):
        return WORKER
    if config.pluginmanager.hasplugin("xdist") and getattr(config.option, "dist", "no") != "no":
        return CONTROLLER
    return SINGLE


# -- what the fixtures hand out -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SessionServer:
    """The server of this test run, as seen from any of its processes.

    Attributes:
        url: where the server listens.
        pid: the server's process id.
        started_by_run: True when this run started it (it stops when the run ends);
            False for a server named with ``--shmstore-url``.
        authkey: the server's key, or None when it comes from the environment
            (``--shmstore-url``).

    Example:
        >>> def test_server(checkpoint_server):
        ...     assert checkpoint_server.stats().server_pid == checkpoint_server.pid
    """

    url: str
    pid: int
    started_by_run: bool
    authkey: bytes | None = dataclasses.field(default=None, repr=False)

    def connect(self, **options: Any) -> BaseStore:
        """A new store connected to this server (options as for `shmstore.connect`).

        Raises:
            ConfigError: no authkey is known (``--shmstore-url`` without
                ``SHMSTORE_AUTHKEY`` or ``SHMSTORE_CONNECTION_FILE``).
        """
        from ..core.factory import connect

        return connect(self.url, authkey=self.authkey, **options)

    def stats(self) -> StoreStats:
        """The server's current figures (one short connection).

        Raises:
            StoreUnavailable: the server is gone.
        """
        with self.connect() as store:
            return store.stats()

    def env(self) -> dict[str, str]:
        """Environment variables with which ``shmstore.connect()`` in a subprocess finds it.

        Example:
            >>> subprocess.run([sys.executable, "tool.py"], env={**os.environ,
            ...                 **checkpoint_server.env()})
        """
        out = {"SHMSTORE_URL": self.url}
        if self.authkey is not None:
            out["SHMSTORE_AUTHKEY"] = self.authkey.hex()
        return out


# -- the controller's (or single process's) side ------------------------------------------


class _Launcher:
    """Starts the run's server on first request, once; stops it at the end."""

    def __init__(self) -> None:
        import secrets

        self.authkey = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._server: StoreServer | None = None
        self._closed = False

    @property
    def started(self) -> StoreServer | None:
        """The server, if one was started."""
        return self._server

    def ensure(self) -> StoreServer:
        """The run's server, started now if this is the first request.

        Raises:
            StoreUnavailable: it could not be started, or the run is ending.
        """
        from ..core.errors import StoreUnavailable
        from ..server.process import serve

        with self._lock:
            if self._closed:
                raise StoreUnavailable("the test run is ending; its server is stopped",
                                       address="")
            if self._server is None:
                self._server = serve(authkey=self.authkey, export=False)
                log.info("started the test run's shmstore server %d at %s",
                         self._server.pid, self._server.url)
            return self._server

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._server is not None:
                self._server.shutdown()


class _LaunchListener:
    """Answers the workers' requests for the server on a unix socket (controller only)."""

    def __init__(self, launcher: _Launcher) -> None:
        self._launcher = launcher
        self._dir = tempfile.mkdtemp(prefix="shmstore-pytest-")  # mode 0700
        self.path = os.path.join(self._dir, "launch.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self._sock.listen(64)
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="shmstore-launch",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            ready, _, _ = select.select([self._sock.fileno(), self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                peer, _ = self._sock.accept()
            except OSError:
                continue
            self._answer(peer)

    def _answer(self, peer: socket.socket) -> None:
        from multiprocessing import AuthenticationError, connection

        from ..backends.wire import set_io_timeout
        from ..core.errors import ShmstoreError

        peer.setblocking(True)
        conn = connection.Connection(peer.detach())
        try:
            set_io_timeout(conn.fileno(), HANDSHAKE_TIMEOUT)
            key = self._launcher.authkey
            connection.deliver_challenge(conn, key)
            connection.answer_challenge(conn, key)
            request = json.loads(conn.recv_bytes(256))
            reply: dict[str, Any]
            if request != {"op": "start"}:
                reply = {"error": f"unknown request {request!r}"}
            else:
                try:
                    server = self._launcher.ensure()
                    reply = {"url": server.url, "pid": server.pid}
                except ShmstoreError as exc:
                    reply = {"error": str(exc)}
            conn.send_bytes(json.dumps(reply).encode())
        except (OSError, EOFError, ValueError, AuthenticationError) as exc:
            log.warning("refused a request for the test run's server: %s", exc)
        finally:
            conn.close()

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join(HANDSHAKE_TIMEOUT)
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        shutil.rmtree(self._dir, ignore_errors=True)


# -- the worker's side ---------------------------------------------------------------------


def _ask_controller(path: str, authkey: bytes) -> tuple[str, int]:
    """Ask the controller's launch socket for the server; return its URL and pid.

    Raises:
        StoreUnavailable: the controller is gone or could not start the server.
    """
    from multiprocessing import AuthenticationError, connection

    from ..backends.wire import set_io_timeout
    from ..core.errors import StoreUnavailable

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn: Connection | None = None
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        sock.connect(path)
        sock.settimeout(None)
        conn = connection.Connection(sock.detach())
        set_io_timeout(conn.fileno(), LAUNCH_TIMEOUT)
        connection.answer_challenge(conn, authkey)
        connection.deliver_challenge(conn, authkey)
        conn.send_bytes(json.dumps({"op": "start"}).encode())
        reply = json.loads(conn.recv_bytes())
    except (OSError, EOFError, ValueError, AuthenticationError) as exc:
        raise StoreUnavailable(
            f"cannot reach the xdist controller for the shared store ({path}): {exc}",
            address=path,
        ) from None
    finally:
        sock.close()
        if conn is not None:
            conn.close()
    if "error" in reply:
        raise StoreUnavailable(f"the xdist controller could not start the shared store: "
                               f"{reply['error']}", address=path)
    return str(reply["url"]), int(reply["pid"])


def _process_memory() -> dict[str, int]:
    """This process's pid, RSS and peak RSS in bytes."""
    import psutil

    from ..monitor.sampler import peak_rss

    rss = psutil.Process().memory_info().rss
    return {"pid": os.getpid(), "rss": rss, "peak_rss": peak_rss(rss)}


# -- one run's state, per process ----------------------------------------------------------


class _RunStore:
    """What this process knows about the run's store; kept in ``config.stash``."""

    def __init__(self, config: pytest.Config) -> None:
        self.role = _role(config)
        self.url: str | None = config.getoption("shmstore_url")
        self.report: bool = config.getoption("shmstore_report")
        self.memory: bool = config.getoption("shmstore_memory")
        self.workerinput: dict[str, Any] = getattr(config, "workerinput", {})
        # The run's id: the executions its per-test figures go to (--shmstore-memory).
        self.run: str = self.workerinput.get(PLAN_RUN) or _memory().run_id()
        self.tracker: Any = None  # this process's MemoryTracker, if it runs tests
        # Only a key and a lock: the server itself starts when first asked for.
        self.launcher = _Launcher() if self.role != WORKER and self.url is None else None
        self.listener: _LaunchListener | None = None
        self.worker_figures: dict[str, dict[str, Any]] = {}
        self._server: SessionServer | None = None
        self._lock = threading.Lock()

    def server(self) -> SessionServer:
        """The run's server, started (or asked for) on first use."""
        with self._lock:
            if self._server is None:
                self._server = self._find_server()
            return self._server

    def _find_server(self) -> SessionServer:
        from ..core.errors import ConfigError

        if self.url is not None:
            from ..core.factory import connect

            try:
                store = connect(self.url)
            except ConfigError as exc:
                if "no authkey" not in str(exc):
                    raise
                raise ConfigError(
                    f"no authkey for --shmstore-url {self.url}: the key never comes from the "
                    "command line; set SHMSTORE_AUTHKEY (hex) or SHMSTORE_CONNECTION_FILE "
                    "(the file `shmstore serve --connection-file PATH` wrote) in pytest's "
                    "environment",
                    value=self.url,
                ) from None
            with store:
                pid = store.stats().server_pid
            return SessionServer(self.url, pid, started_by_run=False)
        if self.role == WORKER:
            if PLAN_SOCKET not in self.workerinput:
                raise ConfigError(
                    "this xdist worker got no shared store from its controller (remote "
                    "workers cannot reach it): serve one on TCP and pass --shmstore-url",
                    value="",
                )
            key = bytes.fromhex(self.workerinput[PLAN_AUTHKEY])
            url, pid = _ask_controller(self.workerinput[PLAN_SOCKET], key)
            return SessionServer(url, pid, started_by_run=True, authkey=key)
        assert self.launcher is not None
        server = self.launcher.ensure()
        return SessionServer(server.url, server.pid, started_by_run=True,
                             authkey=server.authkey)

    def plan(self) -> dict[str, str]:
        """What a worker needs to ask for the server (the listener starts on first call)."""
        assert self.launcher is not None
        if self.listener is None:
            self.listener = _LaunchListener(self.launcher)
        return {PLAN_SOCKET: self.listener.path, PLAN_AUTHKEY: self.launcher.authkey.hex()}

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self.listener is not None:
            self.listener.close()  # first: no server may start after this
        if self.launcher is not None:
            self.launcher.close()


def _state(config: pytest.Config) -> _RunStore:
    return config.stash[_STATE]


def _memory() -> Any:
    """The per-test memory module (imported when used: it is not small)."""
    from . import pytest_memory

    return pytest_memory


# -- hooks --------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("shmstore", "shared checkpoint store (shmstore)")
    group.addoption(
        "--shmstore-url", dest="shmstore_url", metavar="URL", default=None,
        help="use the shmstore server at URL (unix:///path or tcp://host:port) instead of "
             "starting one; its authkey comes from SHMSTORE_AUTHKEY or "
             "SHMSTORE_CONNECTION_FILE; or Redis at redis://host:port/db",
    )
    group.addoption(
        "--shmstore-report", dest="shmstore_report", action="store_true", default=False,
        help="show the shared store's figures and each worker's memory at the end",
    )
    group.addoption(
        "--shmstore-memory", dest="shmstore_memory", action="store_true", default=False,
        help="measure every test's RSS and USS in every worker, save them to the shared "
             "store, and report the tests after which workers grew most",
    )


def pytest_configure(config: pytest.Config) -> None:
    url = config.getoption("shmstore_url")
    if url is not None:
        _check_url(url)
    config.addinivalue_line(
        "markers", "shmstore_limit_growth(size): fail the test if its process grows by "
                   "more than size (e.g. \"10 MiB\") during its call (shmstore)")
    state = _RunStore(config)
    config.stash[_STATE] = state
    if state.role == CONTROLLER:
        config.pluginmanager.register(_XdistControllerHooks(state), "shmstore-xdist")
    else:  # this process runs the tests: measure them (for the marker, and the option)
        memory = _memory()
        worker = str(state.workerinput.get("workerid", "main"))
        opener = None
        if state.memory:
            def opener() -> BaseStore:
                return state.server().connect(role=memory.ROLE, name=f"pytest-{worker}")
        state.tracker = memory.MemoryTracker(
            opener, execution=f"{memory.PREFIX}{state.run}/{worker}", worker=worker)
        config.pluginmanager.register(state.tracker, "shmstore-memory")


def _check_url(url: str) -> None:
    if url.split(":", 1)[0].lower() in ("redis", "rediss", "redis+unix"):
        return  # a RedisStore: shmstore.connect() opens it, redis-py checks the rest
    from ..backends.wire import parse_url
    from ..core.errors import ConfigError

    try:
        parse_url(url)
    except ConfigError as exc:
        raise pytest.UsageError(f"--shmstore-url: {exc}") from None


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None:
        state.close()


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    state = config.stash.get(_STATE, None)
    if state is not None and state.role == WORKER and state.report:
        config.workeroutput[OUTPUT_KEY] = _process_memory()  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or state.role == WORKER:
        return
    if state.report:
        terminalreporter.write_sep("-", "shmstore")
        for line in _report_lines(state):
            terminalreporter.write_line(line)
    if state.memory:
        terminalreporter.write_sep("-", "shmstore memory per test")
        for line in _memory_lines(state):
            terminalreporter.write_line(line)


def _memory_lines(state: _RunStore) -> list[str]:
    """The per-test memory report, read back from the store (whose figures it clears)."""
    from ..core.errors import ShmstoreError

    memory = _memory()
    if state.tracker is not None:
        state.tracker.close()  # (single process: its figures are all saved)
    try:
        with state.server().connect(role="cli") as store:
            figures = memory.collect(store, state.run)
            memory.discard(store, state.run)
    except ShmstoreError as exc:
        return [f"no figures: the shared store is unavailable ({exc})"]
    return list(memory.report_lines(figures))


class _XdistControllerHooks:
    """Hooks that exist only with pytest-xdist; registered in the controller."""

    def __init__(self, state: _RunStore) -> None:
        self._state = state

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[PLAN_RUN] = self._state.run
        if self._state.url is not None:
            return  # every worker reads --shmstore-url itself
        if not getattr(node.gateway.spec, "popen", False):
            return  # a remote worker cannot reach our unix socket
        node.workerinput.update(self._state.plan())

    def pytest_testnodedown(self, node: Any, error: object) -> None:
        workerid = node.workerinput.get("workerid", "?")
        output = getattr(node, "workeroutput", None) or {}
        figures = output.get(OUTPUT_KEY)
        self._state.worker_figures[workerid] = dict(figures) if figures else {
            "error": str(error or "no figures")}


# -- the report -----------------------------------------------------------------------------


def _format(value: Any, kind: str) -> str:
    from ..core.stats import format_bytes

    return format_bytes(value) if kind == "bytes" else str(value)


def _figures(values: dict[str, Any], rows: tuple[tuple[str, str, str], ...]) -> str:
    return ", ".join(f"{label} {_format(values[key], kind)}"
                     for key, label, kind in rows if key in values)


def _report_lines(state: _RunStore) -> list[str]:
    from ..core.errors import ShmstoreError

    lines = []
    launcher = state.launcher
    if state.url is None and (launcher is None or launcher.started is None):
        lines.append("no test used the shared store: no server was started")
    else:
        server = state.server()
        try:
            figures = server.stats().to_dict()
        except ShmstoreError as exc:
            lines.append(f"server {server.url}: unavailable ({exc})")
        else:
            lines.append(f"server pid {server.pid} at {server.url}: "
                         f"{_figures(figures, SERVER_FIGURES)}")
    if state.role == CONTROLLER:
        for workerid in sorted(state.worker_figures):
            figures = state.worker_figures[workerid]
            if "pid" in figures:
                lines.append(f"worker {workerid} pid {figures['pid']}: "
                             f"{_figures(figures, WORKER_FIGURES)}")
            else:
                lines.append(f"worker {workerid}: no figures ({figures['error']})")
    else:
        figures = _process_memory()
        lines.append(f"this process pid {figures['pid']}: {_figures(figures, WORKER_FIGURES)}")
    return lines


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def checkpoint_server(request: pytest.FixtureRequest) -> SessionServer:
    """The run's shmstore server, shared by every xdist worker: URL, pid, stats, connect.

    Started on first use (by the xdist controller when there are workers) and stopped
    when the run ends; with ``--shmstore-url`` it is that server.

    Raises:
        StoreUnavailable: the server could not be started or reached.

    Example:
        >>> def test_spawns_a_tool(checkpoint_server):
        ...     env = {**os.environ, **checkpoint_server.env()}
    """
    return _state(request.config).server()


@pytest.fixture(scope="session")
def checkpoint_store(checkpoint_server: SessionServer) -> Iterator[BaseStore]:
    """A store shared by every worker of the run; checkpoints saved by one, seen by all.

    Example:
        >>> def test_model(checkpoint_store):
        ...     cp = checkpoint_store.load_or_compute("session", "model", train)
        ...     assert cp.state["accuracy"] > 0.9   # trained once for the whole run
    """
    store = checkpoint_server.connect()
    try:
        yield store
    finally:
        store.close()
