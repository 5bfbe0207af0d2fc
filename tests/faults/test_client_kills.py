"""100 clients SIGKILLed mid-save: the server serves on, shows no partial checkpoint,
and its threads and file descriptors return to where they were.

The clients are forked, in waves, by one spawned "farm" process that imported shmstore
once (100 spawned interpreters would cost more than the test).  The farm is
single-threaded, so fork is safe there.  Each client alternates a ``save`` and a
``save_many`` of four 128 KiB checkpoints that re-save the same four ids, and writes
``b`` to a pipe just before each call and ``e`` just after it: a client whose last byte
is ``b`` died inside a call.  A checker thread in the test reads everything the whole
time: every state must match its digest and the four checkpoints of a batch must always
come from the same ``save_many``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import shmstore
from shmstore import Checkpoint, SharedStore

from ..helpers import SPAWN, reaped, wait_until

CLIENTS = 100
WAVES = 4
BATCH = 4
BLOB = 128 * 1024

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="forks clients: Linux")


def _state(n: int, k: int, size: int) -> dict[str, Any]:
    blob = os.urandom(size)
    return {"n": n, "k": k, "blob": blob, "sha": hashlib.sha256(blob).hexdigest()}


def _client(url: str, key: str, name: str, marks: int) -> None:
    store = SharedStore(url, authkey=key, timeout=10, name=name)
    n = 0
    while True:
        n += 1
        if n % 2:
            cps = [Checkpoint(id=f"{name}-{k}", execution_id=f"{name}-batch",
                              state=_state(n, k, BLOB), metadata={"batch": n})
                   for k in range(BATCH)]
            os.write(marks, b"b")
            store.save_many(cps)
        else:
            cp = Checkpoint(execution_id=f"{name}-single", state=_state(n, 0, BLOB // 2))
            os.write(marks, b"b")
            store.save(cp)
        os.write(marks, b"e")


def _farm(url: str, key: str, out_path: str, seed: int) -> None:
    rng = random.Random(seed)
    killed = mid_call = 0
    per_wave = CLIENTS // WAVES
    for wave in range(WAVES):
        kids = []
        for k in range(per_wave):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                try:
                    _client(url, key, f"c{wave}-{k}", w)
                finally:
                    os._exit(1)
            os.close(w)
            kids.append((pid, r))
        rng.shuffle(kids)
        for pid, r in kids:
            # Kill it once it has saved something, at a random moment of its next calls.
            seen = b""
            deadline = time.monotonic() + 20
            while b"e" not in seen and time.monotonic() < deadline:
                if select.select([r], [], [], 0.5)[0]:
                    seen += os.read(r, 4096)
            time.sleep(rng.uniform(0, 0.004))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            killed += 1
            while select.select([r], [], [], 0)[0]:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                seen += chunk
            os.close(r)
            mid_call += seen.endswith(b"b")
    with open(out_path, "w") as fh:
        json.dump({"killed": killed, "mid_call": mid_call}, fh)


class _Checker(threading.Thread):
    """Reads the whole store until stopped; records anything partial or corrupt."""

    def __init__(self, store: SharedStore) -> None:
        super().__init__(name="checker", daemon=True)
        self.store = store
        self.stop = threading.Event()
        self.problems: list[str] = []
        self.reads = 0
        self.batches = 0

    def check(self) -> None:
        for execution in self.store.executions():
            cps = self.store.list(execution)
            self.reads += 1
            for cp in cps:
                state = cp.state
                if hashlib.sha256(state["blob"]).hexdigest() != state["sha"]:
                    self.problems.append(f"{cp.id}: state does not match its digest")
            if execution.endswith("-batch") and cps:
                self.batches += 1
                numbers = {cp.metadata["batch"] for cp in cps} | {cp.state["n"] for cp in cps}
                if len(cps) != BATCH or len(numbers) != 1:
                    self.problems.append(f"{execution}: a partial save_many: {numbers}")

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.check()
        except BaseException as exc:  # the server must keep serving: any error is one
            self.problems.append(f"checker failed: {exc!r}")


def test_a_hundred_clients_killed_mid_save(tmp_path: Path) -> None:
    with shmstore.serve(export=False) as server:
        store = server.connect(timeout=30)
        store.executions()
        proc = psutil.Process(server.pid)
        threads, fds = proc.num_threads(), proc.num_fds()
        checker = _Checker(server.connect(timeout=30))
        out = tmp_path / "farm.json"
        farm = SPAWN.Process(target=_farm,
                             args=(server.url, server.authkey.hex(), str(out), 8))
        checker.start()
        try:
            with reaped(farm, timeout=90):
                pass
        finally:
            checker.stop.set()
            checker.join(30)
        assert farm.exitcode == 0
        result = json.loads(out.read_text())
        checker.check()  # once more, after the last kill
        checker.store.close()
        assert checker.problems == []
        assert result["killed"] == CLIENTS
        # Most kills land inside a call (encode, send, or wait for the answer).
        assert result["mid_call"] >= CLIENTS // 4, result
        assert checker.reads > CLIENTS and checker.batches >= CLIENTS
        # Every killed client's connection and thread are gone.
        assert wait_until(lambda: (proc.num_threads(), proc.num_fds()) == (threads, fds), 10), \
            ((proc.num_threads(), proc.num_fds()), (threads, fds))
        # And the server serves on.
        cp = store.save(Checkpoint(execution_id="after", state="ok"))
        assert store.load(cp.id).state == "ok"
        print(f"killed {result['killed']} clients, {result['mid_call']} inside a call; "
              f"{checker.reads} reads checked")
        store.close()
