"""The server and its clients at the operating system's limits: threads and descriptors.

A server that cannot start a thread for a new connection, or is out of file descriptors,
refuses that one connection with a frame the client turns into a `StoreUnavailable` that
says why, logs once, and goes on serving; once the limit is lifted, new clients are
served.  A client process out of descriptors gets a `StoreUnavailable` that says so.

Tests run as root, where ``RLIMIT_NPROC`` is not enforced: thread starts are made to fail
with a low ``RLIMIT_AS`` (a new thread's stack needs address space) set in the server's
process after it has started.  The server is the real `run_server`, in a spawned child
that takes commands over a pipe.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

import shmstore
from shmstore import Checkpoint, StoreTimeout, StoreUnavailable
from shmstore.backends.wire import Channel, open_connection, parse_url

from ..helpers import SPAWN, wait_until

# Address space left to the server beyond what it maps once started: enough for its
# existing threads' small allocations, far less than one thread stack (8 MiB).
AS_MARGIN = 3 * 1024 * 1024
CALL_TIMEOUT = 20.0


def _mapped_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _highest_fd() -> int:
    return max(int(name) for name in os.listdir("/proc/self/fd"))


class _LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelname, record.getMessage()))


def _server_child(url: str, authkey: bytes, pipe: Connection) -> None:
    """Serve at ``url``; answer commands from ``pipe`` until ``stop``."""
    from shmstore.backends import wire
    from shmstore.server import manager as server

    records = _LogRecords()
    logger = logging.getLogger("shmstore")
    logger.setLevel(logging.INFO)
    logger.addHandler(records)
    stop = threading.Event()
    ready = threading.Event()
    thread = threading.Thread(
        target=server.run_server, args=(wire.parse_url(url), authkey),
        kwargs={"on_ready": lambda _url: ready.set(), "stop_event": stop,
                "monitor_interval": 3600},
        daemon=True)
    thread.start()
    ready.wait(30)
    # H1's server start may raise the soft descriptor limit: read what it is now.
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    address_space = resource.getrlimit(resource.RLIMIT_AS)
    pipe.send("ready")
    while True:
        command, arg = pipe.recv()
        answer: Any = None
        if command == "limit_threads":
            resource.setrlimit(resource.RLIMIT_AS,
                               (_mapped_bytes() + AS_MARGIN, address_space[1]))
        elif command == "unlimit_threads":
            resource.setrlimit(resource.RLIMIT_AS, address_space)
        elif command == "limit_fds":  # room for ``arg`` more descriptors
            resource.setrlimit(resource.RLIMIT_NOFILE, (_highest_fd() + 1 + arg, nofile[1]))
        elif command == "unlimit_fds":
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
        elif command == "log":  # what the server logged since it was ready
            answer = [r for r in records.records if "listening at" not in r[1]]
        elif command == "stop":
            break
        pipe.send(answer)
    stop.set()
    thread.join(10)
    pipe.send("stopped")


class ChildServer:
    """A `run_server` in a spawned child, limited on command; ``with`` stops and reaps it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.authkey = os.urandom(32)
        self._pipe, child_end = SPAWN.Pipe()
        self._proc = SPAWN.Process(target=_server_child, args=(url, self.authkey, child_end))
        self._proc.start()
        child_end.close()
        if not self._pipe.poll(60) or self._pipe.recv() != "ready":
            self.close()
            raise RuntimeError("the server child did not start")

    def command(self, name: str, arg: Any = None) -> Any:
        self._pipe.send((name, arg))
        if not self._pipe.poll(30):
            raise RuntimeError(f"the server child did not answer {name!r}")
        return self._pipe.recv()

    def connect(self) -> Channel:
        return open_connection(parse_url(self.url), self.authkey, timeout=CALL_TIMEOUT)

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._pipe.send(("stop", None))
                self._pipe.poll(15)
            except OSError:
                pass
        self._proc.join(15)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._pipe.close()

    def __enter__(self) -> ChildServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def child_server(tmp_path: Path) -> Iterator[ChildServer]:
    with ChildServer(f"unix://{tmp_path}/limits.sock") as srv:
        yield srv


def _refused(srv: ChildServer) -> StoreUnavailable:
    """Connect expecting a refusal; the error, which must come before the call timeout."""
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        srv.connect().close()
    assert not isinstance(info.value, StoreTimeout)
    assert time.monotonic() - started < CALL_TIMEOUT
    return info.value


def _try_connect(srv: ChildServer) -> Channel | None:
    try:
        return srv.connect()
    except StoreUnavailable:
        return None


@pytest.mark.timeout(90)
def test_a_server_that_cannot_start_threads_refuses_cleanly_and_serves_again(
    child_server: ChildServer,
) -> None:
    with shmstore.SharedStore(child_server.url, authkey=child_server.authkey,
                              timeout=CALL_TIMEOUT) as good:
        good.save(Checkpoint(execution_id="keep", state=0))  # its thread runs already
        child_server.command("limit_threads")
        try:
            errors = [_refused(child_server) for _ in range(3)]
            # Connections that already have their thread are served all along.
            assert good.save(Checkpoint(execution_id="keep", state=1)).version == 2
        finally:
            child_server.command("unlimit_threads")
        for error in errors:
            assert "cannot start a thread" in str(error), error
            assert error.attrs == {"address": child_server.url}
        fresh = child_server.connect()  # the accept loop lives on
        fresh.close()
        with shmstore.SharedStore(child_server.url, authkey=child_server.authkey,
                                  timeout=CALL_TIMEOUT) as late:
            assert [c.state for c in late.list("keep")] == [0, 1]
    logged = child_server.command("log")
    # One warning when the refusals began, one info line when serving resumed: not one
    # per refused peer.
    assert [level for level, _ in logged] == ["WARNING", "INFO"], logged
    assert "cannot start a thread" in logged[0][1]
    assert "again after refusing 3" in logged[1][1]


@pytest.mark.timeout(90)
def test_a_server_out_of_descriptors_refuses_cleanly_and_serves_again(
    child_server: ChildServer,
) -> None:
    with shmstore.SharedStore(child_server.url, authkey=child_server.authkey,
                              timeout=CALL_TIMEOUT) as good:
        good.save(Checkpoint(execution_id="keep", state=0))
        child_server.command("limit_fds", 6)
        held: list[Channel] = []
        try:
            while (chan := _try_connect(child_server)) is not None:
                held.append(chan)
                assert len(held) < 50, "the descriptor limit was never reached"
            errors = [_refused(child_server) for _ in range(3)]
            assert good.save(Checkpoint(execution_id="keep", state=1)).version == 2
            for error in errors:
                assert "out of file descriptors" in str(error), error
                assert "lost" not in str(error)
            # Closing some lets new clients in (once the server has seen them go).
            for chan in held[:3]:
                chan.close()
            del held[:3]
            def admitted() -> bool:
                chan = _try_connect(child_server)
                if chan is not None:
                    held.append(chan)
                return chan is not None

            assert wait_until(admitted, 30)
        finally:
            for chan in held:
                chan.close()
            child_server.command("unlimit_fds")
        assert [c.state for c in good.list("keep")] == [0, 1]
    logged = child_server.command("log")
    assert [level for level, _ in logged] == ["WARNING", "INFO"], logged
    assert "out of file descriptors" in logged[0][1]
    assert "serving new connections again" in logged[1][1]


def _client_at_fd_limit(url: str, authkey: bytes, pipe: Connection) -> None:
    """In a spawned child: leave no free descriptor, call the store, report the error."""
    store = shmstore.SharedStore(url, authkey=authkey, timeout=CALL_TIMEOUT)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_highest_fd() + 1, hard))
    # Descriptors below the limit freed since (none expected) are taken up as well.
    spare = []
    try:
        while True:
            spare.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    try:
        store.executions()
        outcome: tuple[str, str] = ("no error", "")
    except BaseException as exc:  # report whatever it is: the test checks the type
        outcome = (type(exc).__name__, str(exc))
    for fd in spare:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    pipe.send(outcome)


@pytest.mark.timeout(90)
def test_a_client_out_of_descriptors_gets_store_unavailable_saying_so(
    server: shmstore.StoreServer,
) -> None:
    parent_end, child_end = SPAWN.Pipe()
    proc = SPAWN.Process(target=_client_at_fd_limit,
                         args=(server.url, server.authkey, child_end))
    proc.start()
    try:
        child_end.close()
        assert parent_end.poll(60), "the client child did not report"
        kind, message = parent_end.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        parent_end.close()
    assert proc.exitcode == 0
    assert kind == "StoreUnavailable", (kind, message)
    assert "this process is out of file descriptors" in message
    assert "ulimit -n" in message


@pytest.mark.timeout(60)
def test_a_stopped_server_ends_its_accepter_and_gives_back_its_descriptors(
    tmp_path: Path,
) -> None:
    from shmstore.backends import wire
    from shmstore.server import manager as server

    before = set(os.listdir("/proc/self/fd"))
    stop, ready = threading.Event(), threading.Event()
    url = f"unix://{tmp_path}/inproc.sock"
    thread = threading.Thread(
        target=server.run_server, args=(wire.parse_url(url), os.urandom(32)),
        kwargs={"on_ready": lambda _url: ready.set(), "stop_event": stop,
                "monitor_interval": 3600},
        name="inproc-server", daemon=True)
    thread.start()
    try:
        assert ready.wait(30)
        # on_ready comes just before serve_forever starts the accepter.
        assert wait_until(
            lambda: any(t.name == "shmstore-accepter" for t in threading.enumerate()), 10)
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "shmstore-accepter"]
    # The listener and the accepter's reserve descriptor are closed.
    assert wait_until(lambda: set(os.listdir("/proc/self/fd")) <= before, 5)
