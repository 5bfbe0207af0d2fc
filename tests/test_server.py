"""The server's lifecycle, addresses, keys and failure modes, on real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import shmstore
from shmstore import Checkpoint, ConfigError, StoreUnavailable

from .helpers import reap, wait_until


def test_default_address_is_a_socket_in_a_private_directory() -> None:
    with shmstore.serve(export=False) as srv:
        assert srv.url.startswith("unix:///")
        path = srv.url[len("unix://"):]
        directory = os.path.dirname(path)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert len(srv.authkey) == 32
        assert psutil.pid_exists(srv.pid)
    assert not os.path.exists(path)
    assert not os.path.exists(directory)
    assert not psutil.pid_exists(srv.pid) or psutil.Process(srv.pid).status() == "zombie"


def test_each_server_gets_its_own_random_key() -> None:
    with shmstore.serve(export=False) as a, shmstore.serve(export=False) as b:
        assert a.authkey != b.authkey


def test_tcp_port_zero_picks_a_free_port() -> None:
    with shmstore.serve("tcp://127.0.0.1:0", export=False) as srv:
        assert srv.url.startswith("tcp://127.0.0.1:")
        assert int(srv.url.rsplit(":", 1)[1]) > 0
        with srv.connect() as store:
            assert store.save(Checkpoint(execution_id="x")).version == 1


def test_a_non_loopback_bind_needs_allow_remote() -> None:
    with pytest.raises(ConfigError, match="allow_remote"):
        shmstore.serve("tcp://0.0.0.0:0", export=False)


@pytest.mark.parametrize("url", ["http://x", "unix://relative.sock", "tcp://127.0.0.1",
                                 "tcp://:80", "tcp://[::1]:80", "", "unix:///" + "x" * 200])
def test_malformed_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        shmstore.serve(url, export=False)
    with pytest.raises(ConfigError):
        shmstore.connect(url, authkey=b"k")


def test_a_given_unix_path_and_key(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    with shmstore.serve(f"unix://{sock}", authkey="ab" * 16, export=False) as srv:
        assert srv.authkey == bytes.fromhex("ab" * 16)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        with shmstore.connect(srv.url, authkey="ab" * 16) as store:
            store.save(Checkpoint(execution_id="x"))
    assert not sock.exists()


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))  # bound, never listening: what a SIGKILLed server leaves
    stale.close()
    assert sock.exists()
    with shmstore.serve(f"unix://{sock}", export=False) as srv:
        with pytest.raises(ConfigError, match="already listening"):
            shmstore.serve(f"unix://{sock}", export=False)
        assert srv.running
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        shmstore.serve(f"unix://{regular}", export=False)


def test_shutdown_is_idempotent_and_restores_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHMSTORE_URL", "unix:///previous.sock")
    srv = shmstore.serve()
    assert os.environ["SHMSTORE_URL"] == srv.url
    srv.shutdown()
    srv.shutdown()
    assert os.environ["SHMSTORE_URL"] == "unix:///previous.sock"
    assert "SHMSTORE_AUTHKEY" not in os.environ
    assert not srv.running


def test_connection_file_is_private_and_connects(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "conn.json"
    with shmstore.serve(export=False, connection_file=str(path)) as srv:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        data = json.loads(path.read_text())
        assert data == {"url": srv.url, "authkey": srv.authkey.hex(), "pid": srv.pid}
        monkeypatch.setenv("SHMSTORE_CONNECTION_FILE", str(path))
        with shmstore.connect() as store:
            assert store.save(Checkpoint(execution_id="x")).version == 1
    assert not path.exists()


def test_connect_without_a_server_named_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="SHMSTORE_URL"):
        shmstore.connect()
    with pytest.raises(ConfigError, match="authkey"):
        shmstore.connect("unix:///tmp/x.sock")


def test_no_server_is_store_unavailable_naming_the_address(tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/none.sock"
    with shmstore.connect(url, authkey=b"k") as store:
        with pytest.raises(StoreUnavailable) as info:
            store.executions()
    assert info.value.address == url
    assert isinstance(info.value, ConnectionError)


# The server killed or frozen under load, wrong keys, hostile peers: tests/faults/.


def test_a_client_reconnects_when_a_server_is_back(tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/s.sock"
    key = os.urandom(32)
    store = shmstore.connect(url, authkey=key, timeout=5)
    with shmstore.serve(url, authkey=key, export=False):
        store.save(Checkpoint(execution_id="x"))
    with pytest.raises(StoreUnavailable):
        store.executions()
    with shmstore.serve(url, authkey=key, export=False):
        assert store.executions() == []  # a fresh server, reached by the same store object
    store.close()


STARTER = """
import os, sys, time
import shmstore
srv = shmstore.serve(export=False)
print(srv.pid, flush=True)
time.sleep(60)
"""


def test_server_exits_within_2s_when_its_starter_is_killed() -> None:
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert starter.stdout is not None
        server_pid = int(starter.stdout.readline())
        assert psutil.pid_exists(server_pid)
        starter.kill()
        starter.wait(10)
        killed = time.monotonic()

        def gone() -> bool:
            try:
                return psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        assert wait_until(gone, 5.0)
        assert time.monotonic() - killed < 2.0
    finally:
        reap(starter)


def test_cli_serve_runs_in_the_foreground_and_stops_on_sigterm(tmp_path: Path) -> None:
    conn = tmp_path / "conn.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmstore", "serve", "--connection-file", str(conn)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening at unix://" in line
        assert stat.S_IMODE(os.stat(conn).st_mode) == 0o600
        data = json.loads(conn.read_text())
        with shmstore.connect(data["url"], authkey=data["authkey"]) as store:
            store.save(Checkpoint(execution_id="cli"))
        out = subprocess.run(
            [sys.executable, "-m", "shmstore", "stats", "--json", "--connection-file", str(conn)],
            capture_output=True, text=True, check=True,
        )
        stats = json.loads(out.stdout)
        assert stats["checkpoints"] == 1 and stats["server_pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not conn.exists()
        assert not os.path.exists(data["url"][len("unix://"):])
    finally:
        reap(proc)


def test_cli_serve_stops_on_sigint() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "shmstore", "serve"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert "listening" in proc.stdout.readline()
        conn_line = proc.stdout.readline()
        assert conn_line.startswith("export SHMSTORE_CONNECTION_FILE=")
        conn_file = conn_line.split("=", 1)[1].strip()
        assert stat.S_IMODE(os.stat(conn_file).st_mode) == 0o600
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert not os.path.exists(conn_file)
    finally:
        reap(proc)
