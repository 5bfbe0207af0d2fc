"""Peers that send garbage, half a frame, the wrong key, or stop reading.

Each is refused or dropped, the server keeps serving everyone else, no unauthenticated
peer makes it allocate more than a few kilobytes, and a peer without the key learns
nothing about the store.  The other way round, a client that reaches a peer which is not
a shmstore server (an HTTP or SMTP server, Redis, garbage, silence) or a stopped server
gets a `StoreUnavailable` or `StoreTimeout` that says so, soon, never a bare error.

The server is the real `run_server` in a harness child
(tests/faults/harness.py) whose timeouts are 0.5 s instead of 10 s and which can report
its threads, file descriptors, traced allocations and any unpickling.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing import AuthenticationError, connection
from pathlib import Path
from typing import Any

import pytest

import shmstore
from shmstore import AccessDenied, Checkpoint, SharedStore, StoreTimeout, StoreUnavailable
from shmstore.backends import wire
from shmstore.backends.wire import Channel, open_connection, pack, parse_url, unpack

from ..helpers import wait_until
from ..redis_server import RedisServer
from .harness import HarnessServer

# What one unauthenticated peer may make the server allocate (Python heap, traced).
UNAUTH_ALLOCATION_BOUND = 8 * 1024
GiB = 1024**3


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[HarnessServer]:
    with HarnessServer(f"unix://{tmp_path}/h.sock") as srv:
        yield srv


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[HarnessServer]:
    # A long monitor interval: its samples would add noise to the traced peak.
    with HarnessServer(f"unix://{tmp_path}/t.sock", trace=True, monitor_interval=3600) as srv:
        yield srv


def _raw(url: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(parse_url(url).target)
    return sock


def _read_until_closed(sock: socket.socket | int, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or ``timeout`` runs out (False)."""
    fd = sock if isinstance(sock, int) else sock.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], remaining)[0]:
            break
        try:
            chunk = os.read(fd, 65536)
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _frames(data: bytes) -> list[bytes]:
    out = []
    while len(data) >= 4:
        (size,) = struct.unpack("!i", data[:4])
        out.append(data[4:4 + size])
        data = data[4 + size:]
    assert data == b"", f"a partial frame: {data!r}"
    return out


def _send_nothing(sock: socket.socket) -> None:
    pass


def _hang_up(sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_WR)


# Pre-authentication garbage: what each sends after connecting (then it stalls).
GARBAGE: dict[str, Callable[[socket.socket], None]] = {
    "random bytes": lambda s: s.sendall(os.urandom(3000)),
    "an HTTP request": lambda s: s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    "a header promising 2 GiB": lambda s: s.sendall(struct.pack("!i", 2**31 - 1)),
    "a long header promising 1 TiB": lambda s: s.sendall(struct.pack("!iQ", -1, 2**40)),
    "a negative length": lambda s: s.sendall(struct.pack("!i", -7) + b"x" * 40),
    "half a header": lambda s: s.sendall(b"\x00\x00"),
    "half a frame": lambda s: s.sendall(struct.pack("!i", 200) + b"x" * 100),
    "a wrong 16-byte digest": lambda s: s.sendall(struct.pack("!i", 16) + os.urandom(16)),
    "nothing at all": _send_nothing,
    "a hang-up": _hang_up,
}


@pytest.mark.parametrize("attack", list(GARBAGE))
def test_garbage_before_authentication_is_refused_and_others_are_served(
    harness: HarnessServer, attack: str,
) -> None:
    good = harness.connect(timeout=5)
    good.save(Checkpoint(execution_id="keep", state=1))
    baseline = harness.command("report")
    sock = _raw(harness.url)
    try:
        GARBAGE[attack](sock)
        # The server serves others while this peer misbehaves.
        assert good.save(Checkpoint(execution_id="keep", state=2)).version == 2
        data, closed = _read_until_closed(sock, timeout=5.0)
    finally:
        sock.close()
    assert closed, "the server kept a misbehaving peer's connection open"
    frames = _frames(data)
    # All it ever hears: the challenge, and at most the failure of its answer.
    assert frames[0].startswith(b"#CHALLENGE#")
    assert frames[1:] in ([], [b"#FAILURE#"])
    assert [c.state for c in good.list("keep")] == [1, 2]
    assert wait_until(lambda: harness.command("report")["threads"] <= baseline["threads"], 5)
    assert harness.command("report")["unpickles"] == []
    good.close()


class _Recorder:
    """A connection that records every message it receives (for the handshake)."""

    def __init__(self, conn: connection.Connection) -> None:
        self.conn = conn
        self.received: list[bytes] = []

    def send_bytes(self, data: bytes) -> None:
        self.conn.send_bytes(data)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        data = self.conn.recv_bytes(maxlength)
        self.received.append(data)
        return data


def _wrong_key_transcript(url: str) -> tuple[list[bytes], bytes]:
    sock = _raw(url)
    conn = connection.Connection(os.dup(sock.fileno()))
    recorder = _Recorder(conn)
    with pytest.raises(AuthenticationError):
        connection.answer_challenge(recorder, os.urandom(32))  # type: ignore[arg-type]
    rest, closed = _read_until_closed(sock, timeout=5.0)
    conn.close()
    sock.close()
    assert closed
    return recorder.received, rest


def test_a_wrong_key_learns_nothing_about_the_store(harness: HarnessServer) -> None:
    empty_transcript, empty_rest = _wrong_key_transcript(harness.url)
    with harness.connect(timeout=5) as store:
        for i in range(50):
            store.save(Checkpoint(execution_id=f"secret-{i}", state={"pw": "hunter2" * i}))
        full_transcript, full_rest = _wrong_key_transcript(harness.url)
        # Through the API: a typed refusal naming the address, nothing else.
        with SharedStore(harness.url, authkey=os.urandom(32), timeout=5) as bad:
            with pytest.raises(AccessDenied) as info:
                bad.executions()
        assert info.value.attrs == {"address": harness.url}
        assert isinstance(info.value, PermissionError)
        assert "secret" not in str(info.value)
        assert store.stats().checkpoints == 50
    # A random challenge, then the failure, then a closed socket: no traceback, no data,
    # and the same shape whether the store is empty or full.
    for transcript, rest in ((empty_transcript, empty_rest), (full_transcript, full_rest)):
        assert [m[:11] for m in transcript] == [b"#CHALLENGE#", b"#FAILURE#"]
        assert rest == b""
    assert [len(m) for m in empty_transcript] == [len(m) for m in full_transcript]
    assert empty_transcript[0] != full_transcript[0]  # the challenge is fresh each time


@pytest.mark.parametrize("attack", ["a header promising 2 GiB", "a long header promising 1 TiB",
                                    "half a frame", "random bytes", "nothing at all"])
def test_an_unauthenticated_peer_cannot_make_the_server_allocate(
    traced: HarnessServer, attack: str,
) -> None:
    warm = _raw(traced.url)  # the first connection warms caches that every later one reuses
    _read_until_closed(warm, timeout=0.2)
    warm.close()
    time.sleep(0.6)
    # What the harness's own command handling allocates, to tell it apart from the peer's.
    start = traced.command("reset_peak")
    control = traced.command("report")["peak"] - start["current"]
    start = traced.command("reset_peak")
    sock = _raw(traced.url)
    try:
        GARBAGE[attack](sock)
        _, closed = _read_until_closed(sock, timeout=5.0)
    finally:
        sock.close()
    assert closed
    grew = traced.command("report")["peak"] - start["current"] - control
    assert grew < UNAUTH_ALLOCATION_BOUND, f"{attack}: the server allocated {grew} bytes"


def _authenticated(url: str, key: bytes) -> Channel:
    return open_connection(parse_url(url), key, timeout=5, name="raw")


def test_an_authenticated_peer_allocates_what_it_sends_not_what_it_promises(
    traced: HarnessServer,
) -> None:
    chan = _authenticated(traced.url, traced.authkey)
    before = traced.command("reset_peak")
    sent = 2 * 1024 * 1024
    os.write(chan.fd, struct.pack("!iQ", -1, 4 * GiB))
    view = memoryview(os.urandom(sent))
    while view:
        view = view[os.write(chan.fd, view):]
    data, closed = _read_until_closed(chan.fd, timeout=5.0)
    chan.close()
    assert closed and data == b""  # dropped when the rest did not come
    after = traced.command("report")
    grew = after["peak"] - before["current"]
    # Growth follows the bytes that arrived (the buffer doubles), never the 4 GiB promised.
    assert sent <= grew < 3 * sent, grew


def test_half_a_frame_from_an_authenticated_client_does_not_pin_a_thread(
    harness: HarnessServer,
) -> None:
    good = harness.connect(timeout=5)
    good.save(Checkpoint(execution_id="keep", state=0))
    baseline = harness.command("report")
    stalled = [_authenticated(harness.url, harness.authkey) for _ in range(5)]
    try:
        assert harness.command("report")["threads"] == baseline["threads"] + 5
        request = pack(("save", [["x"] * 8, None]))
        for i, chan in enumerate(stalled):
            # Header and part of a body, or just part of a header; then silence.
            frame = struct.pack("!i", len(request)) + request
            os.write(chan.fd, frame[: 2 if i == 0 else len(frame) // 2])
        started = time.monotonic()
        assert good.save(Checkpoint(execution_id="keep", state=1)).version == 2
        assert wait_until(
            lambda: harness.command("report")["threads"] == baseline["threads"], 5.0)
        assert time.monotonic() - started < 3.0  # frame timeout is 0.5 s in the harness
        for chan in stalled:
            _, closed = _read_until_closed(chan.fd, 2.0)
            assert closed
        assert harness.command("report")["fds"] == baseline["fds"]
    finally:
        for chan in stalled:
            chan.close()
    assert [c.state for c in good.list("keep")] == [0, 1]
    good.close()


def test_a_client_that_stops_reading_answers_does_not_pin_a_thread(
    harness: HarnessServer,
) -> None:
    good = harness.connect(timeout=5)
    big = good.save(Checkpoint(execution_id="big", state=os.urandom(4 * 1024 * 1024)))
    baseline = harness.command("report")
    chan = _authenticated(harness.url, harness.authkey)
    request = pack(("load", [big.id]))
    frame = struct.pack("!i", len(request)) + request
    try:
        for _ in range(8):  # 32 MiB of answers that are never read
            os.write(chan.fd, frame)
        assert wait_until(
            lambda: harness.command("report")["threads"] == baseline["threads"], 5.0)
    finally:
        chan.close()
    assert good.load(big.id).state == big.state
    good.close()


def _call(chan: Channel, message: Any) -> Any:
    chan.send(message if isinstance(message, bytes) else pack(message))
    return unpack(chan.recv())


@pytest.mark.parametrize("message", [
    b"\xc1 not msgpack",
    pack([1, 2]),
    pack(("__class__", [])),
    pack(("shutdown", [])),
    pack(("save", [[1, 2, 3]])),
    pack(("load", [5, "extra", 1])),
    b"\xd4\x40\x00",  # an exception ext type with a broken payload
    b"\xc7\x05\x63hello",  # an unknown ext type
], ids=["not msgpack", "wrong shape", "dunder op", "stdlib shutdown", "bad record",
        "bad arguments", "broken exception ext", "unknown ext"])
def test_garbage_after_authentication_is_answered_and_the_connection_stays_in_step(
    harness: HarnessServer, message: bytes,
) -> None:
    with harness.connect(timeout=5) as good:
        saved = good.save(Checkpoint(execution_id="keep", state="x"))
        chan = _authenticated(harness.url, harness.authkey)
        try:
            kind, error = _call(chan, message)
            assert kind == "#ERROR"
            assert isinstance(error, Exception)
            # The same connection answers the next good request, and answers it right.
            kind, record = _call(chan, ("load", [saved.id]))
            assert kind == "#RETURN" and record[0] == saved.id
        finally:
            chan.close()
        assert good.list("keep")[0].state == "x"
        assert good.stats().checkpoints == 1
    assert harness.command("report")["unpickles"] == []


# -- peers that are not shmstore servers -------------------------------------------------


@contextlib.contextmanager
def _fake_server(path: Path, greeting: bytes, *, hang_up: bool = False) -> Iterator[str]:
    """A unix-socket peer that sends ``greeting`` to its first client, then waits for it
    to hang up (or hangs up itself); yields its URL and leaves nothing behind."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def run() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:  # the test ended first
            return
        with conn:
            conn.sendall(greeting)
            if hang_up:
                return
            conn.settimeout(60)
            with contextlib.suppress(OSError):
                while conn.recv(4096):
                    pass

    thread = threading.Thread(target=run, name="fake-server", daemon=True)
    thread.start()
    try:
        yield f"unix://{path}"
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        listener.close()
        thread.join(10)
        assert not thread.is_alive()
        path.unlink(missing_ok=True)


NOT_SHMSTORE = {
    "an HTTP reply": (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", False),
    "an SMTP banner": (b"220 mail.example.com ESMTP Postfix\r\n", False),
    "a Redis error": (b"-ERR unknown command\r\n", False),
    "a 3-byte frame": (struct.pack("!i", 3) + b"abc", False),
    "a frame that is not a challenge": (struct.pack("!i", 51) + os.urandom(51), False),
    "a challenge and more": (struct.pack("!i", 51) + b"#CHALLENGE#" + bytes(40) + b"x", False),
    "half a frame, then a hang-up": (struct.pack("!i", 51) + b"#CHALL", True),
    "half a header, then a hang-up": (b"\x00\x00", True),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("peer", list(NOT_SHMSTORE))
def test_a_peer_that_is_not_a_shmstore_server_is_named_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, peer: str,
) -> None:
    # Long waits: the error must come from what the peer said, not from any timeout.
    monkeypatch.setattr(wire, "CLIENT_HANDSHAKE_TIMEOUT", 60.0)
    greeting, hang_up = NOT_SHMSTORE[peer]
    with _fake_server(tmp_path / "peer.sock", greeting, hang_up=hang_up) as url:
        started = time.monotonic()
        with SharedStore(url, authkey=os.urandom(32), timeout=60) as store:
            with pytest.raises(StoreUnavailable) as info:
                store.executions()
        assert time.monotonic() - started < 30
    assert "is not a shmstore server" in str(info.value)
    assert info.value.attrs == {"address": url}


@pytest.mark.timeout(60)
def test_a_silent_peer_fails_after_the_handshake_timeout_naming_both_causes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(wire, "CLIENT_HANDSHAKE_TIMEOUT", 0.5)
    with _fake_server(tmp_path / "silent.sock", b"") as url:
        started = time.monotonic()
        with SharedStore(url, authkey=os.urandom(32), timeout=40) as store:
            with pytest.raises(StoreTimeout) as info:
                store.executions()
        assert time.monotonic() - started < 20  # the handshake's wait, not the call's 40 s
    message = str(info.value)
    assert "not a shmstore server" in message and "stopped or overloaded" in message
    assert info.value.timeout == 0.5


def test_the_handshake_wait_is_never_longer_than_the_call_timeout(tmp_path: Path) -> None:
    assert wire.CLIENT_HANDSHAKE_TIMEOUT > 0.3
    with _fake_server(tmp_path / "silent.sock", b"") as url:
        with SharedStore(url, authkey=os.urandom(32), timeout=0.3) as store:
            with pytest.raises(StoreTimeout) as info:
                store.executions()
    assert info.value.timeout == 0.3


@pytest.mark.timeout(60)
def test_a_redis_server_is_named_within_the_handshake_timeout(
    redis_server: RedisServer,
) -> None:
    url = f"unix://{redis_server.socket_path}"
    started = time.monotonic()
    with shmstore.connect(url, authkey=os.urandom(32).hex(), timeout=30) as store:
        with pytest.raises(StoreTimeout) as info:
            store.executions()
    took = time.monotonic() - started
    assert took < wire.CLIENT_HANDSHAKE_TIMEOUT + 10 < 30, took  # never the 30 s call timeout
    message = str(info.value)
    assert "not a shmstore server" in message and "stopped or overloaded" in message
    with redis_server.client() as client:
        assert client.ping()  # Redis was not hurt


@pytest.mark.timeout(60)
def test_a_stopped_server_is_named_within_the_handshake_timeout(
    server: shmstore.StoreServer,
) -> None:
    with server.connect(timeout=30) as store:
        store.save(Checkpoint(execution_id="keep", state=1))
        os.kill(server.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with server.connect(timeout=30) as fresh:
                with pytest.raises(StoreTimeout) as info:
                    fresh.executions()
            took = time.monotonic() - started
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert took < wire.CLIENT_HANDSHAKE_TIMEOUT + 10 < 30, took
        assert "stopped or overloaded" in str(info.value)
        assert store.executions() == ["keep"]  # it serves again once resumed
