"""The server's lifecycle, addresses, keys and failure modes, on real processes."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import shmstore
from shmstore import Checkpoint, ConfigError, StoreUnavailable

from .helpers import SPAWN, reap, reaped, wait_until


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


ROOT = str(Path(__file__).resolve().parent.parent)


def _serve_with_few_descriptors(conn: Any) -> None:
    """Lower this process's soft descriptor limit, start a server, report, wait (spawn)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    with shmstore.serve(export=False) as srv:
        conn.send(srv.pid)
        conn.recv()  # checked: stop


@pytest.mark.timeout(60)
def test_the_server_raises_its_soft_descriptor_limit_to_the_hard_one() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 64:
        pytest.skip(f"the hard descriptor limit ({hard}) leaves nothing to raise")
    ours, theirs = SPAWN.Pipe()
    child = SPAWN.Process(target=_serve_with_few_descriptors, args=(theirs,))
    with reaped(child):
        theirs.close()
        assert ours.poll(50), "the starter did not report its server"
        server_pid = ours.recv()
        try:
            assert psutil.Process(child.pid).rlimit(psutil.RLIMIT_NOFILE)[0] == 64
            soft, server_hard = psutil.Process(server_pid).rlimit(psutil.RLIMIT_NOFILE)
        finally:
            ours.send("stop")
    ours.close()
    assert child.exitcode == 0
    assert server_hard == hard
    assert soft == hard or soft > 64  # raised (an unlimited hard limit may be capped)


def test_shutdown_leaves_another_servers_socket_alone(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    url = f"unix://{sock}"
    first = shmstore.serve(url, export=False)
    try:
        sock.unlink()  # someone removed it; a second server may now bind the path
        with shmstore.serve(url, export=False) as second:
            first.shutdown()
            assert stat.S_ISSOCK(os.lstat(sock).st_mode), "the first server removed it"
            with second.connect() as store:
                assert store.save(Checkpoint(execution_id="x")).version == 1
        assert not sock.exists()  # its own socket, the second server did remove
    finally:
        first.shutdown()


NO_MAIN_GUARD = """
import multiprocessing, os
import shmstore

server = shmstore.serve()
print("served", os.getpid(), flush=True)
child = multiprocessing.get_context("spawn").Process(target=os.getpid)
child.start()
child.join(60)  # the child dies while it imports this file, at serve()
raise SystemExit(child.exitcode or 3)
"""


def _marked(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["environ"]):
        if (proc.info["environ"] or {}).get("SHMSTORE_TEST_MARKER") == marker:
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
    return found


@pytest.mark.timeout(120)
def test_serve_in_a_spawned_child_importing_main_names_the_guard(tmp_path: Path) -> None:
    script = tmp_path / "no_guard.py"
    script.write_text(NO_MAIN_GUARD)
    marker = os.urandom(8).hex()  # finds this test's processes, and only them
    env = {**os.environ, "PYTHONPATH": ROOT, "SHMSTORE_TEST_MARKER": marker}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        reap(proc)
    assert proc.returncode != 0
    assert 'ConfigError: serve() was called while a spawned child' in err, err[-2000:]
    assert 'if __name__ == "__main__":' in err
    # Only the script's own process started a server; its children refused at once.
    assert [line for line in out.splitlines() if line.startswith("served")] == [
        f"served {proc.pid}"], out
    assert wait_until(lambda: not _marked(marker), timeout=30), _marked(marker)
