"""Soak: 8 processes of mixed operations against one server (``pytest -m soak``).

``SHMSTORE_SOAK_SECONDS`` sets the length (default 60; CI runs 15).  Each worker owns
four executions and keeps a model of them (only it writes there), so every read it
makes is checked exactly: ids, versions and a digest of every state.  All workers also
append numbered checkpoints to one shared execution.  At the end: zero errors, every
worker's executions equal its model, the shared execution holds every acknowledged
save in each worker's order, and the server's RSS after warm-up stays flat.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections import Counter
from typing import Any

import psutil
import pytest

import shmstore
from shmstore import Checkpoint, CheckpointNotFound, SharedStore

from ..helpers import SPAWN, reaped

WORKERS = 8
SECONDS = float(os.environ.get("SHMSTORE_SOAK_SECONDS", "60"))
SIZES = (100, 1000, 10_000, 60_000)
KEEP = 40  # a worker clears an execution that reaches this many checkpoints
SHARED_QUOTA = 400  # shared saves per worker: the only data that is never cleared
WARM_UP = 0.3  # fraction of the run before RSS must stay flat
RSS_SLACK = 32 * 1024 * 1024

pytestmark = pytest.mark.soak


def _digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


class _Own:
    """The model of one worker's executions: execution -> [(id, version, digest)]."""

    def __init__(self) -> None:
        self.records: dict[str, list[tuple[str, int, str]]] = {}
        self.high: dict[str, int] = {}

    def saved(self, execution: str, cid: str, version: int, digest: str) -> int:
        expected = self.high.get(execution, 0) + 1
        self.high[execution] = version
        self.records.setdefault(execution, []).append((cid, version, digest))
        return expected

    def forget(self, execution: str, cid: str | None = None) -> None:
        records = self.records.get(execution, [])
        self.records[execution] = [r for r in records if cid is not None and r[0] != cid]
        if not self.records[execution]:  # an emptied execution starts again at 1
            del self.records[execution]
            self.high.pop(execution, None)


def _worker(store: SharedStore, index: int, seconds: float, out: Any) -> None:
    rng = random.Random(index)
    own = _Own()
    ops: Counter[str] = Counter()
    errors: list[str] = []
    shared = 0

    def check(ok: bool, what: str) -> None:
        if not ok:
            errors.append(what)

    def blob() -> bytes:
        return rng.randbytes(rng.choice(SIZES))

    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        execution = f"soak{index}-{rng.randrange(4)}"
        mine = own.records.get(execution, [])
        r = rng.random()
        try:
            if r < 0.28:
                data = blob()
                cp = store.save(Checkpoint(execution_id=execution, state={"n": n, "b": data}))
                check(cp.version == own.saved(execution, cp.id, cp.version, _digest(data)),
                      f"save {execution}: version {cp.version}")
                ops["save"] += 1
            elif r < 0.36:
                datas = [blob() for _ in range(rng.randrange(2, 7))]
                cps = store.save_many([Checkpoint(execution_id=execution, state={"n": n, "b": d})
                                       for d in datas])
                for cp, d in zip(cps, datas, strict=True):
                    check(cp.version == own.saved(execution, cp.id, cp.version, _digest(d)),
                          f"save_many {execution}: version {cp.version}")
                ops["save_many"] += 1
            elif r < 0.56 and mine:
                cid, version, digest = rng.choice(mine)
                cp = store.load(cid)
                check((cp.version, _digest(cp.state["b"])) == (version, digest), f"load {cid}")
                ops["load"] += 1
            elif r < 0.60 and mine:
                got = store.load_many([m[0] for m in mine])
                check([(c.id, c.version) for c in got] == [m[:2] for m in mine], "load_many")
                ops["load_many"] += 1
            elif r < 0.70:
                got = store.list(execution)
                check([(c.id, c.version, _digest(c.state["b"])) for c in got] == mine,
                      f"list {execution}")
                ops["list"] += 1
            elif r < 0.74:
                latest = store.latest(execution)
                check((latest.id if latest else None) == (mine[-1][0] if mine else None),
                      f"latest {execution}")
                ops["latest"] += 1
            elif r < 0.79 and mine:
                cid = rng.choice(mine)[0]
                check(store.delete(cid) is True, f"delete {cid}")
                own.forget(execution, cid)
                ops["delete"] += 1
            elif r < 0.81:
                check(store.clear(execution) == len(mine), f"clear {execution}")
                own.forget(execution)
                ops["clear"] += 1
            elif r < 0.84 and mine:
                got = store.wait(execution, after_version=mine[-1][1] - 1, timeout=5)
                check(got.id == mine[-1][0], f"wait {execution}")
                ops["wait"] += 1
            elif r < 0.87:
                node = f"node{n % 64}"
                got = store.load_or_compute(f"soak{index}-computed", node, lambda: node)  # noqa: B023 - called at once
                check(got.state == node, f"load_or_compute {node}")
                ops["load_or_compute"] += 1
            elif r < 0.88:
                store.stats()
                ops["stats"] += 1
            elif r < 0.95 and shared < SHARED_QUOTA:
                store.save(Checkpoint(execution_id="shared", node_name=f"w{index}",
                                      state=[index, shared]))
                shared += 1
                ops["save"] += 1
            else:
                names = set(store.executions())
                check(set(own.records) <= names, "executions")
                ops["executions"] += 1
            held = len(own.records.get(execution, []))
            if held >= KEEP:
                check(store.clear(execution) == held, f"clear full {execution}")
                own.forget(execution)
                ops["clear"] += 1
        except (CheckpointNotFound, shmstore.ShmstoreError, AssertionError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    # Nothing lost: the store holds exactly the model, execution by execution.
    for execution in (f"soak{index}-{k}" for k in range(4)):
        got = [(c.id, c.version, _digest(c.state["b"])) for c in store.list(execution)]
        check(got == own.records.get(execution, []), f"final {execution}")
    out.put({"index": index, "ops": dict(ops), "errors": errors, "shared": shared})
    store.close()


def test_soak_eight_processes_of_mixed_operations() -> None:
    with shmstore.serve(export=False) as server:
        store = server.connect(timeout=30)
        out = SPAWN.Queue()
        procs = [SPAWN.Process(target=_worker, args=(store, i, SECONDS, out))
                 for i in range(WORKERS)]
        server_proc = psutil.Process(server.pid)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            started = time.monotonic()
            while not stop.wait(0.25):
                samples.append((time.monotonic() - started, server_proc.memory_info().rss))

        sampler = threading.Thread(target=sample, daemon=True)
        with reaped(*procs, timeout=SECONDS + 60):
            sampler.start()
            results = [out.get(timeout=SECONDS + 60) for _ in procs]
        stop.set()
        sampler.join()
        assert [p.exitcode for p in procs] == [0] * WORKERS
        errors = [e for r in results for e in r["errors"]]
        assert errors == [], errors[:20]
        # The shared execution: every acknowledged save, each worker's in its order.
        shared = store.list("shared")
        assert len(shared) == sum(r["shared"] for r in results)
        for r in results:
            mine = [c.state[1] for c in shared if c.state[0] == r["index"]]
            assert mine == list(range(r["shared"]))
        assert [c.version for c in shared] == list(range(1, len(shared) + 1))
        # Server RSS is flat after warm-up: bounded by the warm-up peak plus slack.
        warm = [rss for t, rss in samples if t <= WARM_UP * SECONDS]
        after = [rss for t, rss in samples if t > WARM_UP * SECONDS]
        assert warm and after
        assert max(after) <= max(warm) + RSS_SLACK, (max(warm), max(after))
        total: Counter[str] = Counter()
        for r in results:
            total.update(r["ops"])
        print(f"\nsoak: {WORKERS} processes, {SECONDS:.0f} s, {sum(total.values())} operations "
              f"{dict(total)}, 0 errors; server RSS warm-up peak {max(warm) / 2**20:.1f} MiB, "
              f"after {max(after) / 2**20:.1f} MiB, final {after[-1] / 2**20:.1f} MiB")
        store.close()
