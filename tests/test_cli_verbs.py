"""``shmstore ls | show | rm | clear | dump | load`` on a real server and a real Redis.

Most run the command in-process (`main([...])`, through `connect()` over the real socket
or Redis, fast); a few run ``python -m shmstore`` as a user would: a pipe from ``dump -``
to ``load -``, the confirmation of ``clear`` on a terminal (a pty), the progress bar.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pty
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import msgpack
import pytest

import shmstore
from shmstore import BaseStore, Checkpoint
from shmstore.cli.main import _parser, main

from .redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)


class Cli:
    """A store (to arrange and check) and the command line on the same backend."""

    def __init__(self, url: str, store: BaseStore) -> None:
        self.url, self.store = url, store

    def run(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        """``main([... --url URL])`` with a stdin that is not a terminal."""
        out, err = io.StringIO(), io.StringIO()
        saved = sys.stdin
        sys.stdin = io.StringIO(stdin)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main([*argv, "--url", self.url])
                except SystemExit as exc:  # argparse's usage errors
                    code = int(exc.code or 0)
        finally:
            sys.stdin = saved
        return code, out.getvalue(), err.getvalue()

    def json(self, *argv: str) -> object:
        code, out, err = self.run(*argv, "--json")
        assert code == 0, err
        return json.loads(out)


def _empty_server_cli(server: shmstore.StoreServer, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.setenv("SHMSTORE_AUTHKEY", server.authkey.hex())  # the CLI's key, as a user's
    store = server.connect(timeout=10.0)
    for name in store.executions():
        store.clear(name)
    return Cli(server.url, store)


def _empty_redis_cli(redis_server: RedisServer) -> Cli:
    redis_server.flush()
    return Cli(redis_server.url, shmstore.connect(redis_server.url, timeout=10.0))


@pytest.fixture(params=["server", "redis"])
def cli(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    if request.param == "server":
        made = _empty_server_cli(request.getfixturevalue("shared_server"), monkeypatch)
    else:
        made = _empty_redis_cli(request.getfixturevalue("redis_server"))
    with made.store:
        yield made


def _runs(store: BaseStore) -> dict[str, list[Checkpoint]]:
    """Two executions: ``a`` (3 checkpoints, parents, metadata, a big state that takes
    the data plane on a server) and ``b`` (1)."""
    when = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
    a1 = store.save(Checkpoint(execution_id="a", node_name="fetch", state={"rows": [1, 2]},
                               metadata={"run": "r1"}, timestamp=when))
    a2 = store.save(Checkpoint(execution_id="a", node_name="big", state=b"\x01" * 300_000,
                               parent_id=a1.id))
    a3 = store.save(Checkpoint(execution_id="a", node_name="report", state="done",
                               parent_id=a2.id, metadata={"run": "r1", "n": 3}))
    b1 = store.save(Checkpoint(execution_id="b", node_name="fetch", state=None))
    return {"a": [a1, a2, a3], "b": [b1]}


def _state_bytes(store: BaseStore, cps: list[Checkpoint]) -> int:
    return sum(len(store.codec.encode(cp.state)) for cp in cps)


# -- ls ----------------------------------------------------------------------------------


def test_ls_lists_every_execution_with_its_counts_bytes_and_last_save(cli: Cli) -> None:
    assert cli.json("ls") == []
    runs = _runs(cli.store)
    rows = cli.json("ls")
    assert rows == [
        {"execution_id": name, "checkpoints": len(cps),
         "state_bytes": _state_bytes(cli.store, cps), "latest_version": cps[-1].version,
         "last_saved": cps[-1].timestamp.isoformat()}
        for name, cps in runs.items()]
    code, out, _ = cli.run("ls")
    assert code == 0
    header, line_a, line_b = out.splitlines()
    assert header.split() == ["EXECUTION", "CHECKPOINTS", "STATE", "LATEST", "LAST", "SAVED"]
    assert line_a.split()[:3] == ["a", "3", "293.0"]  # 300,000 + 18 bytes: 293.0 KiB
    assert line_b.split()[:2] == ["b", "1"]


def test_ls_of_one_execution_lists_its_checkpoints(cli: Cli) -> None:
    runs = _runs(cli.store)
    rows = cli.json("ls", "a", "--newest-first", "--limit", "2")
    assert [(r["version"], r["id"], r["node_name"]) for r in rows] == [  # type: ignore[index]
        (cp.version, cp.id, cp.node_name) for cp in reversed(runs["a"][1:])]
    assert rows[0]["parent_id"] == runs["a"][1].id  # type: ignore[index]
    code, out, err = cli.run("ls", "nope")
    assert (code, out) == (1, "") and "no checkpoints in execution 'nope'" in err


# -- show --------------------------------------------------------------------------------


def test_show_prints_a_checkpoint_by_id_or_an_executions_latest(cli: Cli) -> None:
    runs = _runs(cli.store)
    first, last = runs["a"][0], runs["a"][-1]
    shown = cli.json("show", first.id)
    assert shown == {"id": first.id, "execution_id": "a", "node_name": "fetch", "version": 1,
                     "timestamp": "2024-05-06T07:08:09.123456+00:00", "parent_id": None,
                     "metadata": {"run": "r1"}, "state": {"rows": [1, 2]}}
    assert cli.json("show", "--latest", "a")["id"] == last.id  # type: ignore[index]
    code, out, _ = cli.run("show", "--latest", "a")
    assert code == 0 and f"id:           {last.id}" in out and '"done"' in out
    code, _, err = cli.run("show", "no-such-id")
    assert code == 1 and "no-such-id" in err
    code, _, err = cli.run("show", "--latest", "nope")
    assert code == 1 and "no checkpoints in execution 'nope'" in err
    for argv in (("show",), ("show", first.id, "--latest", "a")):
        code, _, err = cli.run(*argv)
        assert code == 2 and "one of them" in err


# -- rm ----------------------------------------------------------------------------------


def test_rm_deletes_and_exits_1_naming_the_ids_it_did_not_find(cli: Cli) -> None:
    runs = _runs(cli.store)
    a1, a2, _ = runs["a"]
    assert cli.run("rm", a1.id)[:2] == (0, "deleted 1 checkpoint\n")
    code, out, err = cli.run("rm", a2.id, "missing-1", a1.id, "--json")
    assert code == 1
    assert json.loads(out) == {"deleted": [a2.id], "not_found": ["missing-1", a1.id]}
    assert [cp.id for cp in cli.store.list("a")] == [runs["a"][2].id]
    code, _, err = cli.run("rm", "missing-2")
    assert code == 1 and "no checkpoint 'missing-2'" in err


# -- clear -------------------------------------------------------------------------------


def test_clear_refuses_without_yes_when_stdin_is_not_a_terminal(cli: Cli) -> None:
    _runs(cli.store)
    code, out, err = cli.run("clear", "a", stdin="y\n")
    assert code == 2 and out == "" and "pass --yes" in err
    assert cli.store.executions() == ["a", "b"]  # nothing dropped


def test_clear_says_how_many_it_dropped_per_execution(cli: Cli) -> None:
    _runs(cli.store)
    code, out, err = cli.run("clear", "a", "nope", "--yes", "--json")
    assert code == 1 and err == ""  # --json: the missing one is in the answer
    assert json.loads(out) == {"cleared": {"a": 3, "nope": 0}, "not_found": ["nope"]}
    assert cli.store.executions() == ["b"]
    cli.store.save(Checkpoint(execution_id="c"))
    code, out, _ = cli.run("clear", "--all", "-y")
    assert (code, out) == (0, "b\t1\nc\t1\n")
    assert cli.store.executions() == []
    assert cli.run("clear", "--all", "--yes")[0] == 0  # an empty store: nothing to do
    for argv in (("clear", "--yes"), ("clear", "a", "--all", "--yes")):
        code, _, err = cli.run(*argv)
        assert code == 2 and "one of them" in err


# -- dump and load ----------------------------------------------------------------------


def _dump(cli: Cli, path: Path) -> bytes:
    code, out, err = cli.run("dump", str(path))
    assert code == 0, err
    assert out.startswith("dumped ") and out.endswith(f" to {path}\n")
    return path.read_bytes()


def _snapshot(store: BaseStore) -> dict[str, list[tuple[object, ...]]]:
    return {name: [(*r[:7], bytes(r.state)) for r in store.list_records(name)]
            for name in store.executions()}


def test_dump_then_load_is_byte_exact_from_server_to_redis_to_server(
    shared_server: shmstore.StoreServer, redis_server: RedisServer,
    server: shmstore.StoreServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    source = _empty_server_cli(shared_server, monkeypatch)
    with source.store, _empty_redis_cli(redis_server).store as middle_store:
        middle = Cli(redis_server.url, middle_store)
        _runs(source.store)
        first = _dump(source, tmp_path / "first.dump")
        code, out, err = middle.run("load", str(tmp_path / "first.dump"))
        assert (code, out) == (0, "loaded 4 checkpoints into 2 executions\n"), err
        assert _snapshot(middle.store) == _snapshot(source.store)  # versions, timestamps ...
        assert _dump(middle, tmp_path / "second.dump") == first
        monkeypatch.setenv("SHMSTORE_AUTHKEY", server.authkey.hex())
        with server.connect() as last_store:
            last = Cli(server.url, last_store)
            assert last.run("load", str(tmp_path / "second.dump"))[0] == 0
            assert _dump(last, tmp_path / "third.dump") == first
            loaded = last_store.load(source.store.list("a")[1].id)
            assert loaded.state == b"\x01" * 300_000 and loaded.version == 2
    items = list(msgpack.Unpacker(io.BytesIO(first), raw=False))
    assert items[0] == {"format": "shmstore-dump", "version": 1}
    assert [item[1] for item in items[1:-1]] == ["a", "a", "a", "b"]
    assert items[-1]["records"] == 4


def test_load_refuses_executions_with_checkpoints_unless_replace(cli: Cli, tmp_path: Path
                                                                 ) -> None:
    runs = _runs(cli.store)
    dumped = _dump(cli, tmp_path / "d")
    cli.store.clear("b")
    extra = cli.store.save(Checkpoint(execution_id="a", node_name="later"))
    code, _, err = cli.run("load", str(tmp_path / "d"))
    assert code == 2 and "('a')" in err and "--replace" in err
    assert cli.store.executions() == ["a"]  # b was not loaded either
    assert cli.run("load", str(tmp_path / "d"), "--replace")[0] == 0
    assert [cp.id for cp in cli.store.list("a")] == [cp.id for cp in runs["a"]]
    assert extra.id not in {cp.id for cp in cli.store.list("a")}
    assert _dump(cli, tmp_path / "again") == dumped


def test_load_refuses_versions_with_gaps_unless_renumber(cli: Cli, tmp_path: Path) -> None:
    runs = _runs(cli.store)
    cli.store.delete(runs["a"][1].id)  # a: versions 1 and 3
    _dump(cli, tmp_path / "d")
    cli.store.clear("a")
    cli.store.clear("b")
    code, _, err = cli.run("load", str(tmp_path / "d"))
    assert code == 2 and "gaps in their versions ('a')" in err and "--renumber" in err
    assert cli.store.executions() == []
    assert cli.run("load", str(tmp_path / "d"), "--renumber")[0] == 0
    assert [(cp.id, cp.version) for cp in cli.store.list("a")] == [
        (runs["a"][0].id, 1), (runs["a"][2].id, 2)]


def test_a_load_that_fails_half_way_is_undone(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # 1,001 records: a first batch of 1,000 fits, the second does not (max_checkpoints).
    with shmstore.serve(export=False) as source_server, shmstore.serve(
            export=False, limits={"max_checkpoints": 1000}) as target_server:
        with source_server.connect() as store:
            store.save_many(Checkpoint(execution_id=f"e{i % 3}", state=i) for i in range(1001))
            monkeypatch.setenv("SHMSTORE_AUTHKEY", source_server.authkey.hex())
            _dump(Cli(source_server.url, store), tmp_path / "d")
        monkeypatch.setenv("SHMSTORE_AUTHKEY", target_server.authkey.hex())
        with target_server.connect() as target:
            code, out, err = Cli(target_server.url, target).run("load", str(tmp_path / "d"))
            assert code == 2 and out == ""
            assert "StoreFull" in err and "nothing was loaded" in err
            assert target.executions() == []
            assert target.stats().checkpoints == 0


def _corruptions(good: bytes) -> dict[str, tuple[bytes, str]]:
    items = list(msgpack.Unpacker(io.BytesIO(good), raw=False))
    header, end = msgpack.packb(items[0]), msgpack.packb(items[-1])
    assert good.startswith(header) and good.endswith(end)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01  # inside the 300 kB state
    newer = msgpack.packb({"format": "shmstore-dump", "version": 2})
    return {
        "empty": (b"", "is empty"),
        "not a dump": (b"\x93\x01\x02\x03 not msgpack at all", "not a shmstore dump"),
        "cut at a record boundary": (good[:-len(end)], "is truncated: 4 records"),
        "cut inside a record": (good[:len(good) // 2], "is truncated"),
        "a flipped bit": (bytes(flipped), "checksum does not match"),
        "a newer format": (newer + good[len(header):], "reads version 1"),
        "data after the end": (good + b"\x01", "data after its end item"),
        "a record of the wrong shape": (header + msgpack.packb([1, 2]) + good[len(header):],
                                        "record 1 of"),
        "not msgpack inside": (header + b"\xc1" + good[len(header):], "corrupt"),
    }


def test_a_corrupt_or_truncated_dump_loads_nothing_and_says_why(cli: Cli, tmp_path: Path
                                                                ) -> None:
    _runs(cli.store)
    good = _dump(cli, tmp_path / "good")
    for name in cli.store.executions():
        cli.store.clear(name)
    for case, (data, message) in _corruptions(good).items():
        path = tmp_path / "bad"
        path.write_bytes(data)
        code, out, err = cli.run("load", str(path))
        assert code == 2, case
        assert out == "" and err.startswith("shmstore: DecodeError: ") and message in err, (
            case, err)
        assert cli.store.executions() == [], case
    code, _, err = cli.run("load", str(tmp_path / "missing"))
    assert code == 2 and "cannot read dump file" in err


def test_dump_writes_a_private_file_atomically_replacing_a_symlink(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _runs(cli.store)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    link = tmp_path / "out.dump"
    link.symlink_to(victim)
    _dump(cli, link)
    assert not link.is_symlink() and stat.S_IMODE(link.stat().st_mode) == 0o600
    assert victim.read_text() == "keep me"
    monkeypatch.setenv("SHMSTORE_AUTHKEY", "00" * 32)  # a key: the failure is the server's
    code, _, err = Cli(f"unix://{tmp_path}/no-server.sock", cli.store).run(
        "dump", str(tmp_path / "never.dump"))
    assert code == 2 and "StoreUnavailable" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.dump", "victim"]  # no temp


# -- the parser --------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_subcommand_and_argument_has_help() -> None:
    parser = _parser()
    commands = _subparsers(parser)
    helps = {a.dest: a.help for a in parser._actions
             if isinstance(a, argparse._SubParsersAction)
             for a in a._choices_actions}
    assert {"ls", "show", "rm", "clear", "dump", "load"} <= set(commands)
    missing = [name for name in commands if not helps.get(name)]
    missing += [f"{name} {action.dest}" for name, sub in commands.items()
                for action in sub._actions if not action.help]
    assert missing == []


def test_every_read_verb_takes_json() -> None:
    for name in ("stats", "ls", "show", "doctor", "rm", "clear"):
        assert "--json" in _subparsers(_parser())[name]._option_string_actions, name


# -- through real processes -------------------------------------------------------------


def _shmstore(*argv: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "shmstore", *argv], capture_output=True,
                          timeout=60, check=False, **kwargs)  # type: ignore[call-overload]


def test_dump_to_stdout_piped_into_load_from_stdin(
    shared_server: shmstore.StoreServer, redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = _empty_server_cli(shared_server, monkeypatch)
    with source.store, _empty_redis_cli(redis_server).store as target:
        _runs(source.store)
        dumped = _shmstore("dump", "-", "--url", shared_server.url)
        assert dumped.returncode == 0, dumped.stderr
        assert b"dumped 4 checkpoints of 2 executions to stdout" in dumped.stderr
        loaded = _shmstore("load", "-", "--url", redis_server.url, input=dumped.stdout)
        assert loaded.returncode == 0, loaded.stderr
        assert _snapshot(target) == _snapshot(source.store)


def _read_until(fd: int, text: bytes) -> bytes:
    seen = b""
    while text not in seen:
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError(f"{text!r} never came; got {seen!r}")
        seen += chunk
    return seen


@pytest.mark.parametrize(("answer", "code", "left"), [("y", 0, []), ("n", 1, ["a", "b"])])
def test_clear_asks_on_a_terminal(cli: Cli, answer: str, code: int, left: list[str]) -> None:
    _runs(cli.store)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "shmstore", "clear", "a", "b", "--url",
                             cli.url], stdin=terminal, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    os.close(terminal)
    try:
        assert proc.stderr is not None
        prompt = b""
        while b"[y/N]" not in prompt:  # the child asks: our cue to answer
            byte = proc.stderr.read(1)
            assert byte, prompt
            prompt += byte
        assert b"drop every checkpoint of 2 executions (a, b)?" in prompt
        os.write(controller, f"{answer}\n".encode())
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == code
        assert cli.store.executions() == left
        assert out == (b"a\t3\nb\t1\n" if answer == "y" else b"")
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_dump_draws_a_progress_bar_only_on_a_terminal(cli: Cli, tmp_path: Path) -> None:
    pytest.importorskip("rich")
    _runs(cli.store)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "shmstore", "dump", str(tmp_path / "d"),
                             "--url", cli.url], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    try:
        drawn = b""
        with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
            while chunk := os.read(controller, 4096):
                drawn += chunk
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    assert proc.returncode == 0 and b"dumped 4 checkpoints" in out
    assert b"dumping" in drawn
    plain = _shmstore("dump", str(tmp_path / "e"), "--url", cli.url)
    assert plain.returncode == 0 and plain.stderr == b""  # not a terminal: no bar


# -- watch ----------------------------------------------------------------------------------


def test_watch_prints_every_checkpoint_in_order_then_stops_at_count(cli: Cli) -> None:
    ids = [cli.store.save(Checkpoint(execution_id="w", node_name=f"n{i}", state=i)).id
           for i in range(3)]
    code, out, err = cli.run("watch", "w", "--count", "3")
    assert code == 0, err
    lines = [line.split("\t") for line in out.splitlines()]
    assert [(v, cid, node) for v, cid, node, _ in lines] == [
        (str(i + 1), ids[i], f"n{i}") for i in range(3)]
    rows = [json.loads(line) for line in cli.run("watch", "w", "--after-version", "1",
                                                  "--count", "2", "--json")[1].splitlines()]
    assert [r["version"] for r in rows] == [2, 3]  # resumed after version 1


def test_watch_ends_when_idle_and_says_so_by_exit_code(cli: Cli) -> None:
    cp = cli.store.save(Checkpoint(execution_id="w", state=1))
    code, out, _ = cli.run("watch", "w", "--idle", "0.2")
    assert code == 0 and out.split("\t")[:2] == ["1", cp.id]  # no --count: the end is fine
    code, out, _ = cli.run("watch", "w", "--idle", "0.2", "--count", "2")
    assert code == 1 and len(out.splitlines()) == 1  # one came, the second never did
    code, _, err = cli.run("watch", "w", "--idle", "-1")
    assert code == 2 and "ConfigError" in err


def test_watch_follows_live_saves_and_reports_a_clear(cli: Cli) -> None:
    cli.store.save(Checkpoint(execution_id="live", state="first"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmstore", "watch", "live", "--count", "3", "--json",
         "--idle", "60", "--url", cli.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())  # it runs, and has read version 1
        assert first["version"] == 1
        cli.store.save(Checkpoint(execution_id="live", state="second"))
        assert json.loads(proc.stdout.readline())["version"] == 2
        cli.store.clear("live")
        again = cli.store.save(Checkpoint(execution_id="live", state="after the clear"))
        assert json.loads(proc.stdout.readline()) == {"cleared": "live", "last_version": 2}
        assert json.loads(proc.stdout.readline())["id"] == again.id
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
