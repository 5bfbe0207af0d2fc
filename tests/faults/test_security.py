"""The security model, asserted (README "Security model").

Asserted elsewhere, not repeated here:
- the default socket's directory is 0700 and the socket 0600, both removed at shutdown:
  tests/test_server.py::test_default_address_is_a_socket_in_a_private_directory and
  ::test_a_given_unix_path_and_key;
- connection files are 0600 (serve() and ``shmstore serve``):
  tests/test_server.py::test_connection_file_is_private_and_connects,
  ::test_cli_serve_runs_in_the_foreground_and_stops_on_sigterm, ::test_cli_serve_stops_on_sigint;
- a peer with a wrong key gets the challenge, the failure and a closed socket, nothing
  else, whatever the store holds; no unauthenticated peer makes the server allocate more
  than a few kilobytes: tests/faults/test_hostile_peers.py.
"""

from __future__ import annotations

import ast
import logging
import os
import pickle
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import shmstore
from shmstore import Checkpoint, ConfigError, SharedStore, StoreUnavailable
from shmstore.backends.wire import open_connection, parse_url, unpack
from shmstore.core.config import read_connection_file, write_connection_file

from ..helpers import SPAWN, children, reap, reaped, wait_until
from .harness import HarnessServer

PACKAGE = Path(shmstore.__file__).parent
# Pickle is allowed only where multiprocessing itself uses it between a parent and the
# workers it spawned (anonymous pipes, never a socket): the pipeline runner.
PICKLE_ALLOWED = {"pipeline.py"}


def test_no_module_that_touches_the_socket_can_unpickle() -> None:
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name in PICKLE_ALLOWED:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [alias.name for alias in node.names]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.Name):
                names = [node.id]
            for name in names:
                if name.split(".")[0] in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle") \
                        or name in ("Unpickler", "ForkingPickler", "marshal"):
                    offenders.append(f"{path.name}:{node.lineno}: {name}")
    assert offenders == []


def _every_operation(store: SharedStore) -> None:
    """Call every operation a client can send, and a few that fail."""
    a = store.save(Checkpoint(execution_id="e", node_name="n", state={"x": (1, 2)},
                              metadata={"m": 1}))
    b, c = store.save_many([Checkpoint(execution_id="e", state=[1]),
                            Checkpoint(execution_id="f", state=b"raw")])
    assert store.load(a.id).state == {"x": (1, 2)}
    assert [cp.id for cp in store.load_many([b.id, c.id])] == [b.id, c.id]
    assert len(store.list("e", limit=5, newest_first=True)) == 2
    assert store.latest("e").id == b.id  # type: ignore[union-attr]
    assert store.wait("e", after_version=1, timeout=1).id == b.id
    assert store.load_or_compute("e", "computed", lambda: {"done": True}).state == {"done": True}
    store.stats()
    store.limits()
    store.memory_history()
    assert store.delete(a.id) and store.clear("f") == 1
    assert store.executions() == ["e"]
    for bad in (lambda: store.load("missing"),
                lambda: store.save(Checkpoint(execution_id="e"), expected_version=99),
                lambda: store.wait("never", timeout=0.05)):
        with pytest.raises(shmstore.ShmstoreError):
            bad()


@pytest.fixture
def trapped(tmp_path: Path) -> Iterator[HarnessServer]:
    with HarnessServer(f"unix://{tmp_path}/p.sock") as srv:
        yield srv


def test_nothing_is_ever_unpickled_by_the_server_or_the_client(
    trapped: HarnessServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    calls: list[str] = []

    def trap(name: str) -> Any:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} called")
        return refuse

    from multiprocessing import reduction

    for name in ("loads", "load"):
        monkeypatch.setattr(pickle, name, trap(f"pickle.{name}"))
    monkeypatch.setattr(reduction.ForkingPickler, "loads", trap("ForkingPickler.loads"))
    with trapped.connect(timeout=5) as store:
        _every_operation(store)
        # A pickle that would run a command when unpickled, sent after authentication.
        marker = tmp_path / "pwned"

        class Exploit:
            def __reduce__(self) -> tuple[Any, ...]:
                return (os.system, (f"touch {marker}",))

        payload = pickle.dumps(("load", ("x",), Exploit()))
        chan = open_connection(parse_url(trapped.url), trapped.authkey, timeout=5)
        try:
            chan.send(payload)
            kind, error = unpack(chan.recv())
            assert kind == "#ERROR", error  # read as msgpack, refused as such
        finally:
            chan.close()
        # A wrong key and garbage too.
        with shmstore.connect(trapped.url, authkey=os.urandom(32)) as bad, \
                pytest.raises(shmstore.AccessDenied):
            bad.executions()
        assert store.executions() == ["e"]
    time.sleep(0.2)
    assert not marker.exists()
    assert calls == []  # the client
    assert trapped.command("report")["unpickles"] == []  # the server


def _store_user(store: SharedStore, done: Any) -> None:
    store.save(Checkpoint(execution_id="child", state=1))
    done.wait(60)  # alive until the test has read every command line


def test_the_authkey_is_never_on_any_command_line(tmp_path: Path) -> None:
    conn = tmp_path / "conn.json"
    key = os.urandom(32)
    env = {**os.environ, "SHMSTORE_AUTHKEY": key.hex()}
    cli = subprocess.Popen([sys.executable, "-m", "shmstore", "serve", "--address",
                            f"unix://{tmp_path}/cli.sock", "--connection-file", str(conn)],
                           stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert cli.stdout is not None and "listening" in cli.stdout.readline()
        with shmstore.serve(authkey=key) as server:  # exports the key to children
            store = server.connect()
            done = SPAWN.Event()
            children = [SPAWN.Process(target=_store_user, args=(store, done))
                        for _ in range(2)]
            with reaped(*children, timeout=30):
                assert wait_until(lambda: len(store.list("child")) == 2, 20)
                hexkey, pids = key.hex(), set()
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    cmdline = " ".join(proc.info["cmdline"] or [])
                    assert hexkey not in cmdline and key.hex().upper() not in cmdline, proc
                    pids.add(proc.info["pid"])
                # The scan did see the processes that know the key.
                assert {server.pid, cli.pid, *(p.pid for p in children)} <= pids
                done.set()
            store.close()
    finally:
        cli.terminate()
        cli.wait(10)
        reap(cli)


@pytest.mark.parametrize("url", ["tcp://0.0.0.0:0", "tcp://10.1.2.3:0", "tcp://example.com:0",
                                 "tcp://192.168.0.1:7700"])
def test_a_non_loopback_bind_is_refused_without_allow_remote(url: str) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ConfigError, match="allow_remote=True"):
        shmstore.serve(url, export=False)
    # Refused before any process was started.
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    from shmstore.cli.main import main

    assert main(["serve", "--address", url]) == 2


@pytest.mark.parametrize("url", ["tcp://127.0.0.1:0", "tcp://localhost:0", "tcp://127.9.9.9:0"])
def test_loopback_binds_need_no_flag(url: str) -> None:
    with shmstore.serve(url, export=False) as server, server.connect(timeout=5) as store:
        assert store.save(Checkpoint(execution_id="x")).version == 1


def test_allow_remote_binds_every_interface_and_still_needs_the_key() -> None:
    with shmstore.serve("tcp://0.0.0.0:0", allow_remote=True, export=False) as server:
        port = int(server.url.rsplit(":", 1)[1])
        listening = [c for c in psutil.Process(server.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN]
        assert [c.laddr.ip for c in listening] == ["0.0.0.0"]
        with shmstore.connect(f"tcp://127.0.0.1:{port}", authkey=server.authkey) as store:
            assert store.save(Checkpoint(execution_id="x")).version == 1
        with shmstore.connect(f"tcp://127.0.0.1:{port}", authkey=b"guess") as bad, \
                pytest.raises(shmstore.AccessDenied):
            bad.executions()


def test_the_private_directory_of_the_cli_connection_file_is_0700() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "shmstore", "serve"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "listening" in proc.stdout.readline()
        path = proc.stdout.readline().split("=", 1)[1].strip()
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        proc.terminate()
        proc.wait(10)
        reap(proc)


def test_the_handshake_reads_at_most_256_bytes_before_authentication(
    trapped: HarnessServer,
) -> None:
    # The stdlib's deliver_challenge reads the answer with recv_bytes(256): a longer
    # frame is refused from its header alone.
    import socket

    sock = socket.socket(socket.AF_UNIX)
    sock.connect(parse_url(trapped.url).target)
    try:
        sock.recv(4096)  # the challenge
        sock.sendall(struct.pack("!i", 257) + b"x" * 257)
        sock.settimeout(5)
        try:
            rest = sock.recv(4096)
        except ConnectionResetError:  # closed with the frame unread
            rest = b""
        assert rest == b""  # closed: no failure message, nothing
    finally:
        sock.close()


# -- connection files ----------------------------------------------------------------------


def test_a_connection_file_replaces_a_symlink_and_never_writes_through_it(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "conn.json"
    target.symlink_to(victim)
    write_connection_file(str(target), "unix:///tmp/x.sock", b"k" * 32, os.getpid())
    assert victim.read_text() == "precious"
    st = os.lstat(target)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert read_connection_file(str(target)) == ("unix:///tmp/x.sock", b"k" * 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conn.json", "victim"]  # no temp


def test_a_connection_file_never_truncates_someone_elses_file_it_replaces(
    tmp_path: Path,
) -> None:
    # Another user's file at the path is replaced by a new inode: an open reader of the
    # old one, or a hard link to it, still sees the old contents.
    target = tmp_path / "conn.json"
    target.write_text("theirs")
    link = tmp_path / "hardlink"
    os.link(target, link)
    write_connection_file(str(target), "unix:///tmp/x.sock", b"k" * 32, os.getpid())
    assert link.read_text() == "theirs"
    assert os.stat(target).st_ino != os.stat(link).st_ino


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_connection_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "conn.json"
    write_connection_file(str(path), "unix:///tmp/x.sock", b"k" * 32, os.getpid())
    os.chown(path, 65534, 65534)  # nobody
    with pytest.raises(ConfigError, match=r"owned by uid 65534, not by this user.*you trust"):
        read_connection_file(str(path))


def test_a_connection_file_others_can_read_is_read_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "conn.json"
    write_connection_file(str(path), "unix:///tmp/x.sock", b"k" * 32, os.getpid())
    with caplog.at_level(logging.WARNING, logger="shmstore"):
        assert read_connection_file(str(path))[1] == b"k" * 32
    assert not caplog.records  # 0600: quiet
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="shmstore"):
        assert read_connection_file(str(path))[1] == b"k" * 32
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "readable by others (mode 0644)" in record.getMessage()
    assert "chmod 600" in record.getMessage()


def test_a_connection_file_of_a_dead_server_says_so(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)  # reaped: its pid no longer exists
    path = tmp_path / "conn.json"
    write_connection_file(str(path), "unix:///tmp/x.sock", b"k" * 32, dead.pid)
    with pytest.raises(StoreUnavailable, match=rf"server \(pid {dead.pid}\).*is not running"):
        read_connection_file(str(path))


@pytest.mark.timeout(60)
def test_a_failed_connection_file_write_stops_the_server_and_exports_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SHMSTORE_URL", raising=False)
    monkeypatch.delenv("SHMSTORE_AUTHKEY", raising=False)
    before = {p.pid for p in children()}
    sock = tmp_path / "s.sock"
    missing = tmp_path / "missing" / "conn.json"
    with pytest.raises(ConfigError, match=r"directory .*missing' does not exist; create it"):
        shmstore.serve(f"unix://{sock}", connection_file=str(missing))
    assert "SHMSTORE_URL" not in os.environ and "SHMSTORE_AUTHKEY" not in os.environ
    assert {p.pid for p in children()} == before  # the server child is gone (and reaped)
    assert not sock.exists() and not missing.parent.exists()


def test_a_pickled_store_carries_its_authkey_as_the_readme_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # README "Security model": why children should connect() rather than receive a store.
    key = os.urandom(32)
    store = SharedStore("unix:///tmp/none.sock", authkey=key)
    assert key.hex().encode() in pickle.dumps(store)
    monkeypatch.setenv("SHMSTORE_URL", "unix:///tmp/none.sock")
    monkeypatch.setenv("SHMSTORE_AUTHKEY", key.hex())
    with shmstore.connect() as child_store:  # what a child does instead: key from its env
        assert child_store.url == store.url
