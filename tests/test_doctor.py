"""``shmstore doctor`` on real processes: a planted leak is named, and only it.

Four spawned writers save states that grow (so the server's payload grows); one of them
also keeps every state it made in a list (the leak).  The doctor must call that writer
leaking, the other three and the server steady (the server's growth is its payload's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmstore
from shmstore import Checkpoint
from shmstore.monitor.doctor import diagnose, format_diagnosis
from shmstore.monitor.recorder import MemoryRecorder

from .helpers import SPAWN, reaped, wait_until

ROOT = Path(__file__).resolve().parent.parent
KIB = 1024
WRITERS = 4
LEAKER = 2
WARM_SAVES = 30
JUDGED_SECONDS = 6.0  # of samples after every writer is warm
SAVES_PER_S = 100  # each writer's pace at most (a loaded machine gives less)
KEPT_EXTRA = 192 * KIB  # the leaker keeps this beside each state: >= 16 MiB in the window


def _writer(store: shmstore.SharedStore, index: int, leak: bool, warm: Any, stop: Any) -> None:
    store.name = f"writer-{index}"
    kept = []
    n = 0
    with store:
        t0 = time.monotonic()
        while not stop.is_set():
            size = min(64 * KIB, 1 * KIB + 256 * n)  # growing states
            state = {"n": n, "blob": bytes([n % 256]) * size}
            store.save(Checkpoint(execution_id=f"w{index}", state=state))
            if leak:  # the planted leak: every state stays alive, and more with it
                kept.append((state, bytes([n % 256]) * KEPT_EXTRA))
            n += 1
            if n == WARM_SAVES:
                warm.set()
            ahead = n / SAVES_PER_S - (time.monotonic() - t0)
            if ahead > 0:
                stop.wait(ahead)  # pacing, not synchronisation


@pytest.fixture
def planted_leak() -> Iterator[tuple[shmstore.StoreServer, list[Any]]]:
    server = shmstore.serve(export=False, monitor_interval=0.1)
    stop = SPAWN.Event()
    warm = [SPAWN.Event() for _ in range(WRITERS)]
    procs = [SPAWN.Process(target=_writer, args=(server.connect(), i, i == LEAKER, warm[i],
                                                  stop), name=f"writer-{i}")
             for i in range(WRITERS)]
    try:
        with reaped(*procs):
            try:
                assert all(w.wait(60) for w in warm), "a writer did not start"
                warm_at = time.time()
                with server.connect() as store:
                    # The server's own clock: judge only samples from when all were warm.
                    assert wait_until(lambda: store.memory_history()[-1]["t"]
                                      >= warm_at + JUDGED_SECONDS, timeout=60)
                yield server, procs
            finally:
                stop.set()
    finally:
        server.shutdown()


def test_the_doctor_names_the_leaking_writer_and_only_it(
        planted_leak: tuple[shmstore.StoreServer, list[Any]]) -> None:
    server, procs = planted_leak
    leaker = procs[LEAKER].pid
    with server.connect() as store:
        recorder = MemoryRecorder(store, trend=100_000, trend_seconds=JUDGED_SECONDS)
        d = diagnose(recorder, exclude_pids=frozenset({os.getpid()}))
    verdicts = {f.pid: f.growth.verdict for f in d.clients}
    assert {p.pid for p in procs} <= set(verdicts)
    assert [f.pid for f in d.leaking] == [leaker], format_diagnosis(d)
    assert d.server is not None and d.server.growth.verdict == "steady", format_diagnosis(d)
    assert d.clients[0].pid == leaker  # the worst first
    for p in procs:
        if p.pid != leaker:
            assert verdicts[p.pid] in ("steady", "growing"), format_diagnosis(d)
    text = format_diagnosis(d)
    # every writer's execution keeps its growing states: the payload grows in each
    assert {e.name for e, g in d.executions if g.rank >= 2} == \
        {f"w{i}" for i in range(WRITERS)}, text
    assert "the payload grows in:" in text
    assert f"LEAKING    {leaker}/writer-{LEAKER}" in text
    assert f"leaking: {leaker}/writer-{LEAKER}" in text


def test_shmstore_doctor_prints_it_and_json_names_it(
        planted_leak: tuple[shmstore.StoreServer, list[Any]]) -> None:
    server, procs = planted_leak
    env = {**os.environ, "SHMSTORE_URL": server.url, "SHMSTORE_AUTHKEY": server.authkey.hex(),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                         if p)}
    out = subprocess.run([sys.executable, "-m", "shmstore", "doctor", "--json",
                          "--window", str(JUDGED_SECONDS)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["leaking"] == [f"{procs[LEAKER].pid}/writer-{LEAKER}"]
    assert report["server"]["verdict"] == "steady"
    names = [c["who"] for c in report["clients"]]
    assert not any("shmstore-doctor" in n for n in names)  # the tool is not judged
    plain = subprocess.run([sys.executable, "-m", "shmstore", "doctor", "--window",
                            str(JUDGED_SECONDS)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60)
    assert plain.returncode == 0, plain.stderr
    assert f"leaking: {procs[LEAKER].pid}/writer-{LEAKER}" in plain.stdout
