"""Memory figures through the store API: ``memory_history()`` and ``stats()`` of a real server.

A spawned client connects under a name, allocates 80 MiB, and is then killed: the
server's samples show it growing, then dead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

import shmstore
from shmstore import Checkpoint, ConfigError, MemoryStore
from shmstore.monitor.sampler import ARENA_CAP

from .helpers import SPAWN, reaped, wait_until


def _named_hog(store: Any, ready: Any, go: Any, done: Any) -> None:
    store = shmstore.connect(store.url, authkey=store._authkey.hex(), name="hog-1")
    store.save(Checkpoint(execution_id="hog", state="here"))  # connects, so it registers
    ready.set()
    go.wait(30)
    blob = bytearray(80 * 1024 * 1024)
    for i in range(0, len(blob), 4096):
        blob[i] = 1
    done.set()
    time.sleep(60)


def _client(stats: shmstore.StoreStats, name: str) -> dict[str, Any]:
    return {c["name"]: c for c in stats.clients}[name]


def test_a_named_client_shows_up_growing_then_dead() -> None:
    with shmstore.serve(export=False, monitor_interval=0.05, history_size=50) as server:
        store = server.connect(timeout=10)
        ready, go, done = SPAWN.Event(), SPAWN.Event(), SPAWN.Event()
        proc = SPAWN.Process(target=_named_hog, args=(store, ready, go, done))
        with reaped(proc, timeout=0):
            assert ready.wait(30)
            assert wait_until(lambda: "hog-1" in {c["name"] for c in store.stats().clients}, 10)
            before = _client(store.stats(), "hog-1")
            mark = time.time()
            go.set()
            assert done.wait(30)
            assert wait_until(
                lambda: _client(store.stats(), "hog-1")["rss"] - before["rss"] > 60 * 2**20, 10)
            grown = _client(store.stats(), "hog-1")
            assert grown["alive"] and grown["pid"] == proc.pid
            proc.kill()
            proc.join(10)
        # stats() checks liveness when asked: no waiting for the next sample.
        killed = _client(store.stats(), "hog-1")
        assert killed["alive"] is False and killed["state"] == "gone"  # killed: no goodbye
        assert wait_until(lambda: store.memory_history()[-1]["clients"][str(proc.pid)][2]
                          is False, 10)
        history = store.memory_history(since=mark)
        assert history and all(s["t"] > mark for s in history)
        rss = [s["clients"][str(proc.pid)][1] for s in history if str(proc.pid) in s["clients"]]
        assert max(rss) - before["rss"] > 60 * 2**20
        assert history[-1]["clients"][str(proc.pid)][2] is False
        full = store.memory_history()
        assert 1 <= len(full) <= 50  # bounded by history_size
        assert [s["t"] for s in full] == sorted(s["t"] for s in full)
        store.close()


def test_the_server_sample_carries_the_store_figures() -> None:
    with shmstore.serve(export=False, monitor_interval=0.05) as server:
        store = server.connect(timeout=10)
        store.save(Checkpoint(execution_id="run", state="x" * 1000))
        payload = store.stats().payload_bytes
        assert wait_until(lambda: store.memory_history()[-1]["payload_bytes"] == payload, 10)
        sample = store.memory_history()[-1]
        assert sample["checkpoints"] == 1 and sample["server_rss"] > 0
        assert store.stats().server_peak_rss >= sample["server_rss"]
        store.close()


def test_a_memory_store_samples_its_own_process_when_asked() -> None:
    with MemoryStore() as store:
        store.save(Checkpoint(execution_id="run", state=[1, 2, 3]))
        first = store.memory_history()
        assert len(first) == 1 and first[0]["checkpoints"] == 1 and first[0]["server_rss"] > 0
        assert len(store.memory_history(since=first[0]["t"])) == 1
        stats = store.stats()
        assert stats.clients == [] and stats.server_peak_rss >= stats.server_rss


@pytest.mark.parametrize("since", ["yesterday", True, float("nan")])
def test_a_bad_since_is_a_config_error(since: Any) -> None:
    with MemoryStore() as store, pytest.raises(ConfigError, match="since"):
        store.memory_history(since=since)


def test_the_server_gives_memory_back_after_a_clear() -> None:
    """Freed checkpoints' pages go back to the system (glibc ``malloc_trim``), not just reused."""
    import psutil

    with shmstore.serve(export=False, monitor_interval=0.05) as server:
        store = server.connect(timeout=30)
        proc = psutil.Process(server.pid)
        base = proc.memory_info().rss
        state = "x" * 1000
        for batch in range(80):
            store.save_many([Checkpoint(execution_id=f"e{batch}", state=state)
                             for _ in range(1000)])
        full = proc.memory_info().rss
        assert full - base > 80 * 2**20
        for batch in range(80):
            store.clear(f"e{batch}")
        # Without the trim, 98% of the growth stays resident (measured with the server's
        # malloc arenas capped at 2; 80% with glibc's 16); with it, 20-52% (the arena cap
        # leaves more some runs): 70% tells them apart.
        assert wait_until(lambda: proc.memory_info().rss - base < (full - base) * 0.7, 10), (
            base, full, proc.memory_info().rss)
        store.close()


def _save_in_child(store: Any) -> None:
    store.save(Checkpoint(execution_id="child", state="x"))


def test_a_store_passed_to_a_child_is_named_after_the_child_unless_named() -> None:
    with shmstore.serve(export=False) as server:
        anonymous = server.connect(timeout=10)
        named = server.connect(timeout=10, name="stage-2")
        procs = [SPAWN.Process(target=_save_in_child, args=(s,)) for s in (anonymous, named)]
        with reaped(*procs):
            pass
        assert [p.exitcode for p in procs] == [0, 0]
        names = {c["pid"]: c["name"] for c in anonymous.stats().clients}
        assert names[procs[0].pid] == f"client-{procs[0].pid}"
        assert names[procs[1].pid] == "stage-2"
        anonymous.close()
        named.close()


def test_stats_print_one_line_summaries_and_a_full_report() -> None:
    with shmstore.serve(export=False) as server, server.connect(timeout=10, name="me") as store:
        store.save(Checkpoint(execution_id="run", state="x" * 100))
        stats = store.stats()
        line = stats.summary()
        assert "\n" not in line and line.startswith("1 checkpoints in 1 executions")
        assert "1 clients" in line
        text = str(stats)
        assert "client " in text and " me: RSS" in text and "x its heap payload" not in text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_the_server_caps_its_malloc_arenas_unless_the_environment_chose(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    with shmstore.serve(export=False) as server, server.connect() as store:
        stats = store.stats()
        assert stats.malloc_arenas == ARENA_CAP
        assert f"malloc arenas: at most {ARENA_CAP}" in str(stats)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "1")  # the child inherits it; glibc reads it
    with shmstore.serve(export=False) as server, server.connect() as store:
        assert store.stats().malloc_arenas == 1


def test_stats_tell_the_heap_payload_from_the_shared_one() -> None:
    stats = shmstore.StoreStats(checkpoints=2, executions=1, payload_bytes=48 * 2**20,
                                server_pid=1, server_rss=40 * 2**20, uptime_s=1.0, ops={},
                                segments=1, segment_bytes=32 * 2**20)
    assert stats.heap_payload_bytes == 16 * 2**20
    assert stats.overhead_ratio == pytest.approx(2.5)  # 40 MiB over the 16 MiB in the heap
    assert stats.to_dict()["overhead_ratio"] == pytest.approx(2.5)
    assert "2.50x its heap payload" in str(stats)
    small = shmstore.StoreStats(checkpoints=1, executions=1, payload_bytes=1000, server_pid=1,
                                server_rss=30 * 2**20, uptime_s=1.0, ops={})
    assert small.overhead_ratio is None and "heap payload" not in str(small)


def _short_lived(store: Any, name: str, close: bool, ready: Any, go: Any) -> None:
    store = shmstore.connect(store.url, authkey=store._authkey.hex(), name=name)
    store.save(Checkpoint(execution_id=name, state=1))  # connects, so it registers
    ready.set()
    go.wait(30)
    if close:
        store.close()  # says goodbye; the other one leaves it to the exit


def test_a_client_that_ended_cleanly_exited_and_a_killed_one_is_gone() -> None:
    with shmstore.serve(export=False) as server, server.connect() as store:
        names = ["closes", "just-exits", "killed"]
        # An event each: a process killed while it waits on an event breaks that event
        # (setting it would wait for ever for the dead sleeper to wake).
        ready = {n: SPAWN.Event() for n in names}
        go = {n: SPAWN.Event() for n in names}
        procs = {n: SPAWN.Process(target=_short_lived, args=(store, n, n == "closes",
                                                                ready[n], go[n]))
                 for n in names}
        with reaped(*procs.values()):
            assert all(ready[n].wait(30) for n in names)
            procs["killed"].kill()
            go["closes"].set()
            go["just-exits"].set()
        assert [procs[n].exitcode for n in names] == [0, 0, -9]
        states = {c["name"]: (c["alive"], c["state"], c["role"]) for c in store.stats().clients}
        assert states["closes"] == (False, "exited", "worker")
        assert states["just-exits"] == (False, "exited", "worker")  # closed at its exit
        assert states["killed"] == (False, "gone", "worker")
        assert "killed" in str(store.stats()) and "gone" in str(store.stats())


def test_the_stores_own_tools_register_in_their_roles_and_are_hidden_in_reports() -> None:
    with shmstore.serve(export=False) as server, server.connect(name="me") as store:
        store.stats()
        env = {**os.environ, "SHMSTORE_URL": server.url,
               "SHMSTORE_AUTHKEY": server.authkey.hex()}
        out = subprocess.run([sys.executable, "-m", "shmstore", "stats", "--json"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        seen_by_tool = {c["pid"]: c["role"] for c in json.loads(out.stdout)["clients"]}
        assert "cli" in seen_by_tool.values()  # `shmstore stats` is a cli client
        stats = store.stats()
        roles = {c["name"]: c["role"] for c in stats.clients}
        assert roles["me"] == "worker" and "cli" in roles.values()
        assert [c["name"] for c in stats.workers] == ["me"]
        tool = next(c["name"] for c in stats.clients if c["role"] == "cli")
        assert tool not in str(stats) and "1 clients" in stats.summary()
        with pytest.raises(ConfigError, match="role"):
            server.connect(role="")
