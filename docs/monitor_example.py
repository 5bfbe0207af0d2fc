"""Make docs/monitor.png: ``shmstore monitor`` watching a server with three writer processes.

A real run, nothing simulated:

- a ``shmstore.serve()`` server;
- ``steady``: saves a 64 KiB checkpoint every 10 ms (the server's payload and RSS grow),
  and clears its execution at 14 s (payload falls; watch what the RSS does);
- ``leaky``: saves small checkpoints and keeps 2 MiB of its own per step in a list that
  never shrinks (its own RSS grows, the server's hardly);
- ``doomed``: saves like ``steady``, holding 1 MiB more every 10 saves, until it is killed
  (SIGKILL) at 8 s: the monitor marks it dead;
- and the command itself, in a subprocess, with the server's URL and key in its
  environment::

      shmstore monitor --duration 20 --interval 0.5 --csv docs/monitor.csv --plot docs/monitor.png

Run from the repository root: ``python docs/monitor_example.py`` (needs the ``[cli]`` extra).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shmstore
from shmstore import Checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECONDS = 20
KILL_AT = 8.0
CLEAR_AT = 14.0


def writer(name: str, go: Any) -> None:
    """One writer process; what it does depends on its name (see the module docstring)."""
    store = shmstore.connect(name=name)  # URL and key from the environment serve() exported
    store.latest(name)  # registers this process with the server's monitor
    go.wait(30)
    started = time.monotonic()
    hoard: list[bytearray] = []
    big = {"rows": b"r" * (64 * 1024 - 64)}
    cleared = False
    step = 0
    while time.monotonic() - started < SECONDS + 2:
        step += 1
        if name == "doomed" and step % 10 == 0:
            hoard.append(bytearray(b"d" * (1024 * 1024)))
        if name == "leaky":
            hoard.append(bytearray(b"l" * (2 * 1024 * 1024)))
            store.save(Checkpoint(execution_id=name, state={"step": len(hoard)}))
            time.sleep(0.15)
            continue
        store.save(Checkpoint(execution_id=name, state=big))
        if name == "steady" and not cleared and time.monotonic() - started > CLEAR_AT:
            store.clear(name)
            cleared = True
        time.sleep(0.01)


def main() -> int:
    png = os.path.join(ROOT, "docs", "monitor.png")
    table = os.path.join(ROOT, "docs", "monitor.csv")
    ctx = multiprocessing.get_context("spawn")
    with shmstore.serve() as server:  # exports SHMSTORE_URL / SHMSTORE_AUTHKEY to children
        go = ctx.Event()
        procs = {name: ctx.Process(target=writer, args=(name, go), name=name, daemon=True)
                 for name in ("steady", "leaky", "doomed")}
        for proc in procs.values():
            proc.start()
        env = {**os.environ, "PYTHONPATH": ROOT}
        cmd = [sys.executable, "-m", "shmstore", "monitor", "--duration", str(SECONDS),
               "--interval", "0.5", "--csv", table, "--plot", png]
        print(f"server pid {server.pid} at {server.url}", flush=True)
        print("$ shmstore " + " ".join(cmd[3:]), flush=True)
        try:
            monitor = subprocess.Popen(cmd, cwd=ROOT, env=env)
            with server.connect(name="starter") as store:  # go once the monitor is connected
                while not any(c["name"] == "shmstore-monitor" for c in store.stats().clients):
                    if monitor.poll() is not None:
                        return monitor.returncode
                    time.sleep(0.1)
            time.sleep(1.0)  # a second of quiet at the start of the picture
            go.set()
            time.sleep(KILL_AT)
            os.kill(procs["doomed"].pid or 0, signal.SIGKILL)
            code = monitor.wait(SECONDS + 30)
        finally:
            for proc in procs.values():
                if proc.is_alive():
                    proc.kill()
                proc.join(5)
    return code


if __name__ == "__main__":
    sys.exit(main())
