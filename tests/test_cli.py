"""Everyday messages: ``shmstore serve``'s connection file, ``shmstore ls``, missing keys
and extras, through real processes where the user would meet them."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import shmstore
from shmstore import Checkpoint, ConfigError

from .helpers import reap


def _serve(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "shmstore", "serve", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmstore", *argv], capture_output=True,
                          text=True, timeout=60, env=env)


@pytest.mark.timeout(60)
def test_serve_creates_the_missing_private_directories_of_its_connection_file(
    tmp_path: Path,
) -> None:
    conn = tmp_path / "a" / "b" / "conn.json"
    proc = _serve("--connection-file", str(conn))
    try:
        assert proc.stdout is not None
        assert "listening" in proc.stdout.readline()  # the ready line: the file is written
        for directory in (tmp_path / "a", tmp_path / "a" / "b"):
            assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(conn).st_mode) == 0o600
        data = json.loads(conn.read_text())
        assert data["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not conn.exists()
    finally:
        reap(proc)


def test_serve_help_says_missing_directories_are_created() -> None:
    out = _cli("serve", "--help")
    assert out.returncode == 0
    assert "missing parent directories are created with mode 0700" in " ".join(out.stdout.split())


@pytest.mark.timeout(60)
def test_serve_with_a_connection_file_it_cannot_write_says_what_to_do_in_one_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "file").write_text("not a directory")
    proc = _serve("--connection-file", str(tmp_path / "file" / "conn.json"))
    try:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 2
        assert out == ""  # never said it was listening
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("shmstore: ConfigError: ")
        assert "exists and is not a directory; choose another path" in lines[0]
    finally:
        reap(proc)


@pytest.mark.timeout(60)
def test_serve_stops_cleanly_when_its_connection_file_cannot_be_written(
    tmp_path: Path,
) -> None:
    # The directory exists but cannot take the file (a directory sits at its path): the
    # server has started listening by then; it must stop, remove its socket, and say why.
    conn = tmp_path / "conn.json"
    conn.mkdir()
    sock = tmp_path / "s.sock"
    proc = _serve("--connection-file", str(conn), "--address", f"unix://{sock}")
    try:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 2, err
        assert "listening" not in out
        assert err.startswith(f"shmstore: ConfigError: cannot write connection file '{conn}'")
        assert not sock.exists()
        assert conn.is_dir()  # not removed: it was never ours
    finally:
        reap(proc)


def test_ls_of_an_unknown_execution_says_it_has_no_checkpoints(tmp_path: Path) -> None:
    conn = tmp_path / "conn.json"
    with shmstore.serve(export=False, connection_file=str(conn)) as server:
        with server.connect() as store:
            store.save(Checkpoint(execution_id="known", node_name="n"))
        known = _cli("ls", "known", "--connection-file", str(conn))
        unknown = _cli("ls", "nope", "--connection-file", str(conn))
    assert known.returncode == 0 and "\tn\t" in known.stdout
    assert unknown.returncode == 1
    assert unknown.stdout == ""
    assert unknown.stderr.strip() == "shmstore: no checkpoints in execution 'nope'"


def test_connect_without_an_authkey_names_every_source_of_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("SHMSTORE_URL", "SHMSTORE_AUTHKEY", "SHMSTORE_CONNECTION_FILE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"authkey=.*SHMSTORE_AUTHKEY.*SHMSTORE_CONNECTION_FILE"):
        shmstore.connect("unix:///tmp/none.sock")
    with pytest.raises(ConfigError,
                       match=r"SHMSTORE_URL.*SHMSTORE_CONNECTION_FILE.*shmstore serve"):
        shmstore.connect()


def test_cli_without_an_authkey_names_the_connection_file(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMSTORE_")}
    out = _cli("stats", "--url", f"unix://{tmp_path}/none.sock", env=env)
    assert out.returncode == 2
    assert "SHMSTORE_CONNECTION_FILE" in out.stderr and "--connection-file" in out.stderr


def test_importing_the_langgraph_saver_without_the_extra_names_it(tmp_path: Path) -> None:
    # sys.modules[name] = None makes ``import langgraph`` fail as if it were not installed.
    code = ("import sys; sys.modules['langgraph'] = None; sys.modules['langchain_core'] = None\n"
            "import shmstore.langgraph\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: shmstore.langgraph needs LangGraph"), out.stderr
    assert 'pip install "shmstore[langgraph]"' in last


def test_stats_with_the_connection_file_of_a_dead_server_says_it_is_not_running(
    tmp_path: Path,
) -> None:
    conn = tmp_path / "conn.json"
    proc = _serve("--connection-file", str(conn))
    try:
        assert proc.stdout is not None and "listening" in proc.stdout.readline()
        kept = conn.read_bytes()
        proc.kill()  # SIGKILL: its connection file stays behind
        proc.wait(30)
    finally:
        reap(proc)
    conn.write_bytes(kept)  # as a killed server leaves it, whatever the race with cleanup
    os.chmod(conn, 0o600)
    out = _cli("stats", "--connection-file", str(conn))
    assert out.returncode == 2
    assert f"the server (pid {proc.pid}) that wrote connection file" in out.stderr
    assert "is not running" in out.stderr
