"""RedisStore beyond the contract: key layout, moving between backends, Redis' own limits,
wake-ups without polling, failures, processes, and the tools that take a URL.

The contract suite runs on Redis through the ``store`` fixture (backend "redis"); these
tests start servers of their own where they hurt them.  Without redis-server they skip
with how to enable them (``SHMSTORE_REQUIRE_REDIS=1`` makes that a failure).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmstore
from shmstore import (
    AccessDenied,
    BaseStore,
    Checkpoint,
    ConfigError,
    Pipeline,
    StoreFull,
    StoreUnavailable,
)
from shmstore.core.checkpoint import timestamp_to_us
from shmstore.core.codec import DEFAULT_CODEC, EMPTY_MAP

from .helpers import PLUGIN_ARGS, SPAWN, isolate_inner_runs, reaped, run_all, wait_until
from .redis_server import ENABLE_HINT, ENV_REQUIRE, RedisServer

try:
    import redis  # noqa: F401
except ImportError:
    if os.environ.get(ENV_REQUIRE) == "1":
        raise
    pytest.skip(f"redis-py is not installed; {ENABLE_HINT}", allow_module_level=True)
RedisStore = shmstore.RedisStore
pytest_plugins = ["pytester"]
REPO = Path(__file__).resolve().parents[1]


def cp(execution: str = "run", node: str = "n", state: object = None,
       **kw: Any) -> Checkpoint:
    return Checkpoint(execution_id=execution, node_name=node, state=state, **kw)


@pytest.fixture
def rstore(redis_server: RedisServer) -> Iterator[RedisStore]:
    redis_server.flush()
    with RedisStore(redis_server.url, timeout=10.0) as store:
        yield store


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[Any]:
    client = redis_server.client()
    yield client
    client.close()


def connections(client: Any) -> int:
    """How many connections the Redis server of ``client`` has open (its own included)."""
    return len(client.client_list())


def commandstats(client: Any) -> dict[str, int]:
    return {name[len("cmdstat_"):]: int(v["calls"])
            for name, v in client.info("commandstats").items()}


# -- layout ------------------------------------------------------------------------------


def test_keys_of_an_execution_share_its_hash_tag_and_slot(rstore: RedisStore, raw: Any) -> None:
    from redis.crc import key_slot

    first = rstore.save(cp("run-1", "a", {"x": 1}, parent_id="p"))
    rstore.save(cp("run-1", "b", [1, 2]))
    rstore.save(cp("run-2", "a", "other"))
    keys = {k.decode() for k in raw.keys("shmstore:*")}
    run1 = {k for k in keys if k.startswith("shmstore:{run-1}:")}
    assert run1 == {"shmstore:{run-1}:v", "shmstore:{run-1}:hi",
                    *(f"shmstore:{{run-1}}:r:{c.id}" for c in rstore.list("run-1"))}
    assert len({key_slot(k.encode()) for k in run1}) == 1
    assert {"shmstore:ids", "shmstore:order", "shmstore:execs", "shmstore:ebytes",
            "shmstore:stats", "shmstore:ops"} <= keys
    record = raw.hgetall(f"shmstore:{{run-1}}:r:{first.id}")
    assert record == {b"n": b"a", b"v": b"1", b"t": b"%d" % (
        timestamp_to_us(first.timestamp)), b"p": b"p",
        b"m": EMPTY_MAP,
        b"s": DEFAULT_CODEC.encode({"x": 1})}
    assert raw.zrange("shmstore:{run-1}:v", 0, -1, withscores=True) == [
        (first.id.encode(), 1.0), (rstore.latest("run-1").id.encode(), 2.0)]  # type: ignore[union-attr]
    assert raw.hget("shmstore:ids", first.id) == b"run-1"


def test_execution_ids_with_braces_keep_the_tag_whole_and_never_collide(
    rstore: RedisStore, raw: Any,
) -> None:
    from shmstore.backends.redis import execution_tag

    names = ["a}b", "{a}", "~61", "a", "~"]
    for name in names:
        rstore.save(cp(name, state=name))
    assert rstore.executions() == sorted(names)
    for name in names:
        assert [c.state for c in rstore.list(name)] == [name]
        tag = execution_tag(name)
        assert "{" not in tag and "}" not in tag
        assert raw.exists(f"shmstore:{{{tag}}}:v".encode())
    assert execution_tag("a") == "a" and execution_tag("~61") != "a"


def test_prefixes_are_separate_stores_and_flush_drops_only_its_own(
    redis_server: RedisServer, raw: Any,
) -> None:
    raw.flushdb()
    with RedisStore(redis_server.url, prefix="one:") as one, \
            RedisStore(redis_server.url, prefix="two:") as two:
        one.save(cp(state=1))
        two.save(cp(state=2))
        two.save(cp(state=3))
        assert [c.state for c in one.list("run")] == [1]
        assert two.stats().checkpoints == 2
        assert one.flush() > 0
        assert one.executions() == [] and one.stats().checkpoints == 0
        assert [c.state for c in two.list("run")] == [2, 3]
    with pytest.raises(ConfigError):
        RedisStore(redis_server.url, prefix="{bad}")


# -- one payload, every backend ------------------------------------------------------------


def test_a_checkpoint_moves_between_backends_byte_for_byte(
    rstore: RedisStore, shared_server: shmstore.StoreServer, raw: Any,
) -> None:
    state = {"rows": [1, (2, 3)], "blob": b"\x00\xff" * 100, "f": 1.5, "s": "é"}
    original = cp("move", "stage", state, metadata={"step": 3}, parent_id="root")
    with shared_server.connect(timeout=10.0) as shared, shmstore.MemoryStore() as memory:
        shared.clear("move")
        shared.save(original)
        from_shared = shared._backend.load(original.id)
        # Hand the very record (the bytes as the server keeps them) to Redis, and back.
        rstore._backend.save(from_shared, None)
        from_redis = rstore._backend.load(original.id)
        assert tuple(from_redis) == tuple(from_shared)
        assert raw.hget(f"shmstore:{{move}}:r:{original.id}", "s") == from_shared[7]
        assert from_shared[7] == DEFAULT_CODEC.encode(state)
        memory._backend.save(from_redis, None)
        assert tuple(memory._backend.load(original.id)) == tuple(from_redis)
        shared.clear("move")
        shared._backend.save(from_redis, None)
        assert tuple(shared._backend.load(original.id)) == tuple(from_shared)
        assert rstore.load(original.id) == memory.load(original.id) == shared.load(original.id)
        shared.clear("move")


# -- Redis' own limits ---------------------------------------------------------------------


def test_redis_maxmemory_refusals_become_store_full_and_reads_go_on() -> None:
    with RedisServer(maxmemory=4 * 1024 * 1024) as server, \
            RedisStore(server.url, timeout=10.0) as store:
        blob = os.urandom(64 * 1024)
        saved = []
        with pytest.raises(StoreFull) as info:
            for _ in range(200):
                saved.append(store.save(cp(state=blob)))
        assert info.value.limit == "maxmemory"
        assert info.value.maximum == 4 * 1024 * 1024
        assert info.value.current > 0 and "maxmemory" in str(info.value)
        # The refused save left nothing behind; everything before it is whole.
        stats = store.stats()
        assert stats.checkpoints == len(saved) > 10
        assert [c.id for c in store.list("run")] == [c.id for c in saved]
        assert store.load(saved[0].id).state == blob
        assert store.wait("run").version == len(saved)
        with pytest.raises(StoreFull):
            store.save_many([cp(state=blob), cp(state=blob)])
        assert store.stats().checkpoints == len(saved)
        store.clear("run")  # deleting works at maxmemory, and makes room again
        assert store.save(cp(state=blob)).version == 1


def test_limits_belong_to_the_data_set_not_to_one_client(redis_server: RedisServer,
                                                         raw: Any) -> None:
    raw.flushdb()
    with RedisStore(redis_server.url, limits={"max_checkpoints": 2}) as configured, \
            RedisStore(redis_server.url) as other:
        assert other._backend.limits()["max_checkpoints"] == 2
        other.save(cp())
        other.save(cp())
        with pytest.raises(StoreFull) as info:
            other.save(cp())
        assert (info.value.limit, info.value.maximum, info.value.current) == (
            "max_checkpoints", 2, 2)
        assert configured.stats().to_dict()["checkpoints"] == 2
        assert other._backend.stats()["rejections"] == 1


# -- waiting in Redis ------------------------------------------------------------------------


def test_wait_sleeps_in_redis_a_bounded_number_of_calls(rstore: RedisStore, raw: Any) -> None:
    rstore.save(cp(state="first"))
    before = commandstats(raw)
    saver = threading.Timer(1.0, lambda: rstore.save(cp(state="second")))
    saver.start()
    got = rstore.wait("run", after_version=1, timeout=10)
    saver.join(10)  # its answer may come after the waiter's: the store must outlive it
    after = commandstats(raw)
    assert (got.version, got.state) == (2, "second")
    # The waiter: a check script, one SUBSCRIBE, a check after it, one sleep until the
    # message, a re-check; the timer's save is one more script (and a script's first
    # EVALSHA on a server may be refused with NOSCRIPT).  A poll loop would make hundreds.
    assert after.get("subscribe", 0) - before.get("subscribe", 0) == 1
    assert after.get("evalsha", 0) - before.get("evalsha", 0) <= 5


def test_a_followers_generation_key_lives_while_the_execution_has_checkpoints(
    rstore: RedisStore, raw: Any,
) -> None:
    # A follower may be busy with a checkpoint for longer than a waiter's grace: the key
    # that tells it of a clear must not expire under it meanwhile.
    rstore.save(cp(state="one"))
    it = rstore.follow("run", timeout=10)
    assert next(it).state == "one"  # type: ignore[union-attr]
    assert raw.pttl("shmstore:{run}:g") == -1  # no TTL: kept while "run" has checkpoints
    rstore.clear("run")
    assert raw.pttl("shmstore:{run}:g") > 0   # emptied: it goes once nobody waits
    rstore.save(cp(state="two"))
    assert [getattr(i, "state", i) for i in (next(it), next(it))] == [
        shmstore.Cleared("run", 1), "two"]


def test_a_lease_expiry_hands_over_on_the_redis_clock(rstore: RedisStore, raw: Any) -> None:
    kind, _token = rstore._backend.claim("run", "n", "ghost:1:1", 0.6, 0.0)
    assert kind == "granted"
    before = commandstats(raw)
    started = time.monotonic()
    got = rstore.load_or_compute("run", "n", lambda: "mine", timeout=10)
    assert got.state == "mine" and 0.5 <= time.monotonic() - started < 5
    after = commandstats(raw)
    assert after.get("subscribe", 0) - before.get("subscribe", 0) == 1  # slept until expiry
    assert after.get("evalsha", 0) - before.get("evalsha", 0) <= 8  # no poll loop


@pytest.mark.timeout(60)
def test_a_wait_wakes_at_the_next_save_when_redis_is_at_maxmemory() -> None:
    with RedisServer(maxmemory=4 * 1024 * 1024) as server, \
            RedisStore(server.url, timeout=10.0) as store, server.client() as client:
        blob = os.urandom(64 * 1024)
        filler = []
        with pytest.raises(StoreFull):
            for _ in range(200):
                filler.append(store.save(cp("fill", state=blob)))
        got: list[Any] = []

        def wait() -> None:
            try:
                got.append(store.wait("run", timeout=30))
            except BaseException as exc:  # reported below
                got.append(exc)

        before = commandstats(client)
        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        # Asleep: subscribed to the wake-up channel (or blocked in a command).
        assert wait_until(lambda: commandstats(client).get("subscribe", 0)
                          > before.get("subscribe", 0)
                          or client.info("clients")["blocked_clients"] > 0, 20)
        for checkpoint in filler[:4]:  # make room for one small save
            store.delete(checkpoint.id)
        saved = store.save(cp("run", state="fits"))
        started = time.monotonic()
        waiter.join(30)
        woke_after = time.monotonic() - started
        assert [c.id if isinstance(c, Checkpoint) else c for c in got] == [saved.id]
        # Woken by the save, not by the end of a 10 s wait slice.
        assert woke_after < 5
        after = commandstats(client)
        assert after.get("evalsha", 0) - before.get("evalsha", 0) <= 6 + 4  # no polling


def test_every_waiter_wakes_on_one_save(rstore: RedisStore) -> None:
    got: list[int] = []
    waiters = [threading.Thread(target=lambda: got.append(rstore.wait("fan", timeout=10).version))
               for _ in range(5)]
    waits = rstore.stats().ops.get("wait", 0)
    for t in waiters:
        t.start()
    # The handshake: Redis counts each wait as it begins, before it blocks.
    assert wait_until(lambda: rstore.stats().ops.get("wait", 0) >= waits + 5, 30)
    rstore.save(cp("fan"))
    for t in waiters:
        t.join(10)
    assert got == [1] * 5


# -- failures --------------------------------------------------------------------------------


def test_a_dead_redis_is_store_unavailable_even_for_a_blocked_waiter() -> None:
    server = RedisServer().start()
    try:
        store = RedisStore(server.url, timeout=5.0)
        store.save(cp())
        errors: list[BaseException] = []

        def waiter() -> None:
            try:
                store.wait("run", after_version=1, timeout=30)
            except BaseException as exc:
                errors.append(exc)

        waits = store.stats().ops.get("wait", 0)
        thread = threading.Thread(target=waiter)
        thread.start()
        assert wait_until(lambda: store.stats().ops.get("wait", 0) > waits, 30)  # waiting
        server.kill()
        thread.join(10)
        assert not thread.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], StoreUnavailable)
        with pytest.raises(StoreUnavailable) as info:
            store.latest("run")
        assert info.value.address == server.url
        store.close()
    finally:
        server.stop()


def test_nothing_listening_is_store_unavailable(tmp_path: Path) -> None:
    with RedisStore(f"redis+unix://{tmp_path}/none.sock", timeout=2.0) as store, \
            pytest.raises(StoreUnavailable):
        store.executions()


def test_a_wrong_or_missing_password_is_access_denied(monkeypatch: pytest.MonkeyPatch) -> None:
    with RedisServer(password="s3cret-for-tests") as server:
        with RedisStore(server.url) as store, pytest.raises(AccessDenied):
            store.save(cp())
        monkeypatch.setenv("SHMSTORE_REDIS_PASSWORD", "wrong")
        with RedisStore(server.url) as store, pytest.raises(AccessDenied):
            store.latest("run")
        monkeypatch.setenv("SHMSTORE_REDIS_PASSWORD", "s3cret-for-tests")
        with RedisStore(server.url) as store:
            assert store.save(cp()).version == 1
        assert "s3cret" not in " ".join(psutil_cmdline(server.pid))


def psutil_cmdline(pid: int) -> list[str]:
    import psutil

    return psutil.Process(pid).cmdline()


@pytest.mark.parametrize("url", ["http://x", "redis", "", "unix:///tmp/x.sock"])
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        RedisStore(url)


# -- URLs, processes, tools --------------------------------------------------------------------


def test_connect_with_a_redis_url_gives_a_redis_store() -> None:
    with RedisServer(tcp=True) as server:
        store = shmstore.connect(server.url, timeout=5.0)
        assert isinstance(store, RedisStore) and server.url.startswith("redis://127.0.0.1:")
        with store:
            assert store.save(cp()).version == 1
            assert store.stats().server_pid == server.pid
    with RedisServer() as server, shmstore.connect(server.url) as store:
        assert isinstance(store, RedisStore) and store.latest("run") is None


def _compute_once(store: BaseStore, counter: str) -> None:
    def compute() -> dict[str, int]:
        with open(counter, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return {"by": os.getpid()}

    got = store.load_or_compute("procs", "expensive", compute, timeout=60)
    assert got.version == 1


def test_spawned_processes_compute_once_through_a_pickled_store(rstore: RedisStore,
                                                                tmp_path: Path) -> None:
    counter = tmp_path / "computed"
    assert run_all(_compute_once, [(rstore, str(counter)) for _ in range(4)]) == [0] * 4
    assert len(counter.read_text().splitlines()) == 1
    assert rstore.latest("procs").state["by"] == int(counter.read_text())  # type: ignore[union-attr]


def _save_in_forked_child(store: RedisStore) -> None:
    store.save(cp("forked", state=os.getpid()))
    assert store.latest("forked").state == os.getpid()  # type: ignore[union-attr]


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_a_forked_child_opens_its_own_connections(rstore: RedisStore) -> None:
    import multiprocessing

    rstore.save(cp("forked", state="parent"))  # the parent's pool has a connection now
    child = multiprocessing.get_context("fork").Process(target=_save_in_forked_child,
                                                        args=(rstore,))
    with reaped(child, timeout=30):
        pass
    assert child.exitcode == 0
    assert rstore.latest("forked").state == child.pid  # type: ignore[union-attr]
    assert rstore.load(rstore.list("forked")[0].id).state == "parent"  # parent's pool intact


def _steps_double(state: dict[str, int]) -> dict[str, int]:
    return {**state, "n": state["n"] * 2}


def _steps_add(state: dict[str, int]) -> dict[str, int]:
    return {**state, "n": state["n"] + 1}


def test_a_pipeline_runs_on_redis_across_processes(rstore: RedisStore) -> None:
    from shmstore import CheckpointConfig

    pipe = Pipeline([_steps_double, _steps_add], config=CheckpointConfig(store=rstore))
    assert pipe.run({"n": 5}, execution_id="solo")["n"] == 11
    assert [c.node_name for c in rstore.list("solo")][-2:] == ["_steps_double", "_steps_add"]
    results = pipe.run_many({f"job-{i}": {"n": i} for i in range(6)}, processes=2)
    assert results == {f"job-{i}": {"n": 2 * i + 1} for i in range(6)}
    assert len(rstore.executions()) == 7


def test_cli_stats_takes_a_redis_url(rstore: RedisStore, redis_server: RedisServer) -> None:
    rstore.save(cp(state="x" * 100))
    out = subprocess.run(
        [sys.executable, "-m", "shmstore", "stats", "--url", redis_server.url, "--json"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    assert figures["checkpoints"] == 1 and figures["server_pid"] == redis_server.pid


PLUGIN_TEST = """
import os
from shmstore import Checkpoint, RedisStore

def test_on_redis(checkpoint_store, checkpoint_server):
    assert isinstance(checkpoint_store, RedisStore)
    assert not checkpoint_server.started_by_run
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    checkpoint_store.save(Checkpoint(execution_id="plugin", node_name=worker))
    got = checkpoint_store.load_or_compute("plugin", "once", lambda: worker)
    assert got.state in ("gw0", "gw1", "main")
"""


def test_the_pytest_plugin_takes_a_redis_url(pytester: pytest.Pytester, rstore: RedisStore,
                                             redis_server: RedisServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    isolate_inner_runs(monkeypatch)
    pytester.makepyfile(PLUGIN_TEST)
    result = pytester.runpytest_subprocess(*PLUGIN_ARGS, "-p",
                                           "no:cacheprovider", "-n", "2", "--dist", "each",
                                           "--shmstore-url", redis_server.url, timeout=90)
    result.assert_outcomes(passed=2)
    assert sorted(c.node_name for c in rstore.list("plugin")) == ["gw0", "gw1", "once"]


def test_memory_history_is_the_present_as_one_sample(rstore: RedisStore) -> None:
    rstore.save(cp(state="x"))
    (sample,) = rstore.memory_history()
    assert sample["checkpoints"] == 1 and sample["server_rss"] > 0
    assert rstore.memory_history(since=time.time() + 60) == []


def test_a_redis_store_spawned_child_sees_the_same_data(rstore: RedisStore) -> None:
    rstore.save(cp("spawned", state="from parent"))
    child = SPAWN.Process(target=_save_in_forked_child, args=(rstore,))
    with reaped(child, timeout=60):
        pass
    assert child.exitcode == 0
    assert [c.state for c in rstore.list("spawned")] == ["from parent"]
    assert rstore.latest("forked").state == child.pid  # type: ignore[union-attr]


def test_a_frozen_redis_is_store_timeout_and_the_store_recovers() -> None:
    import signal

    from shmstore import StoreTimeout

    with RedisServer() as server, RedisStore(server.url, timeout=0.5) as store:
        store.save(cp())
        os.kill(server.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreTimeout) as info:
                store.latest("run")
            assert info.value.timeout == 0.5 and time.monotonic() - started < 5
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert store.latest("run").version == 1  # type: ignore[union-attr]


def test_a_store_made_from_a_client_pickles_and_leaves_the_client_open(
    redis_server: RedisServer, raw: Any,
) -> None:
    import pickle

    raw.flushdb()
    client = redis_server.client()
    store = RedisStore(client, prefix="given:")
    store.save(cp(state="via client"))
    copy = pickle.loads(pickle.dumps(store))
    assert isinstance(copy, RedisStore) and copy.prefix == "given:"
    assert [c.state for c in copy.list("run")] == ["via client"]
    before = connections(raw)
    copy.close()  # the copy made its own connections: it closes them
    assert wait_until(lambda: connections(raw) == before - 1, 10), connections(raw)
    store.close()
    assert client.ping()  # not ours to close
    client.close()
    with pytest.raises(ConfigError):
        RedisStore(object())


def test_a_store_dropped_unclosed_closes_its_connections_without_the_collector(
    redis_server: RedisServer, raw: Any,
) -> None:
    import gc
    import weakref

    before = connections(raw)
    gc.disable()  # freed by reference counting alone: the store is in no cycle
    try:
        store = RedisStore(redis_server.url, timeout=10.0)
        store.save(cp(state="x"))
        assert store.wait("run", after_version=0, timeout=5) is not None
        assert connections(raw) == before + 1
        gone = weakref.ref(store)
        del store
        assert gone() is None
    finally:
        gc.enable()
    assert wait_until(lambda: connections(raw) == before, 10), connections(raw)
