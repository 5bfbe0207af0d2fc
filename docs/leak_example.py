"""The planted-leak run behind README's "Who leaks" capture.

A server, four writer processes saving states that grow from 1 KiB to 64 KiB at 2 MiB/s
each, one of them (writer-2) also keeping every state it made in a list.  After ``--seconds`` (20),
it runs ``shmstore monitor --plain --duration 1``, ``shmstore monitor --duration 1`` (the
live view's last frame) and ``shmstore doctor`` against the server and prints what they
print, with how long the doctor took to be sure.

Run ``python docs/leak_example.py`` (``--seconds N``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import shmstore  # noqa: E402
from shmstore import Checkpoint  # noqa: E402
from shmstore.monitor.doctor import diagnose  # noqa: E402
from shmstore.monitor.recorder import MemoryRecorder  # noqa: E402

KIB = 1024
LEAKER = 2
RATE = 2 * 1024 * KIB  # bytes each writer saves per second (a steady, paced workload)


def writer(store: shmstore.SharedStore, index: int, leak: bool, stop: Any) -> None:
    store.name = f"writer-{index}"
    kept = []
    n = written = 0
    with store:
        t0 = time.monotonic()
        while not stop.is_set():
            state = {"n": n, "blob": bytes([n % 256]) * min(64 * KIB, KIB + 256 * n)}
            store.save(Checkpoint(execution_id=f"w{index}", state=state))
            if leak:
                kept.append(state)
            n += 1
            written += len(state["blob"])
            ahead = written / RATE - (time.monotonic() - t0)
            if ahead > 0:
                stop.wait(ahead)  # pacing, not synchronisation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    with shmstore.serve(export=False) as server:
        env = {**os.environ, "SHMSTORE_URL": server.url,
               "SHMSTORE_AUTHKEY": server.authkey.hex(), "PYTHONPATH": str(ROOT)}
        procs = [ctx.Process(target=writer, args=(server.connect(), i, i == LEAKER, stop))
                 for i in range(4)]
        for p in procs:
            p.start()
        started = time.time()
        named_at = None
        try:
            with server.connect(name="shmstore-doctor", role="monitor") as store:
                while time.time() - started < args.seconds:
                    d = diagnose(MemoryRecorder(store, trend=100_000),
                                 exclude_pids=frozenset({os.getpid()}))
                    leaking = [f.pid for f in d.leaking]
                    if named_at is None and leaking == [procs[LEAKER].pid]:
                        named_at = time.time() - started
                    time.sleep(0.5)
            monitor = subprocess.run(
                [sys.executable, "-m", "shmstore", "monitor", "--plain", "--duration", "1"],
                env=env, capture_output=True, text=True, timeout=60)
            live = subprocess.run(  # not a terminal: rich prints the last frame at the end
                [sys.executable, "-m", "shmstore", "monitor", "--duration", "1"],
                env={**env, "COLUMNS": "90"}, capture_output=True, text=True, timeout=60)
            doctor = subprocess.run([sys.executable, "-m", "shmstore", "doctor"], env=env,
                                    capture_output=True, text=True, timeout=60)
        finally:
            stop.set()
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
    print("$ shmstore monitor --plain --duration 1")
    print(monitor.stdout.strip().splitlines()[-1] if monitor.stdout.strip() else monitor.stderr)
    print("\n$ shmstore monitor")
    print(live.stdout.rstrip() or live.stderr)
    print("\n$ shmstore doctor")
    print(doctor.stdout.rstrip() or doctor.stderr)
    print(f"\nthe doctor named writer-{LEAKER} alone "
          + (f"{named_at:.1f} s after the writers started" if named_at is not None
             else "not within the run"))


if __name__ == "__main__":
    main()
