"""What starting shmstore costs: the import of a client, and ``serve()`` to the first save.

Two measurements (issue 13, point 7):

- import: ``python -X importtime -c "from shmstore import connect; connect"`` in a fresh
  interpreter, summing the cumulative time of the shmstore rows that no other shmstore
  row contains (what importing shmstore costs, its dependencies included).  The same for
  a client that builds its store (``connect(URL, authkey=...)``, which imports
  `SharedStore`), and for the server child (``import shmstore.server.process`` and
  ``shmstore.server.manager``).  Also listed: whether the client imported any
  ``shmstore.server`` module.  Target: the plain import under 60 ms.
- start: from ``shmstore.serve(export=False)`` to the first completed ``save`` of a
  client connected to it, against ``multiprocessing.managers.SyncManager`` started with
  the spawn context until its first ``dict()`` proxy item is set.  Runs alternate
  (shmstore, SyncManager, shmstore, ...) so that drift of a shared machine hits both;
  shutdown is not timed.  Reported: medians, the spread (min..max), and the median of
  the per-pair ratio.  Target: shmstore under 100 ms.

Bytecode: by default every process of the bench (the clients measured, the server
children, SyncManager's) caches compiled modules in a private directory
(``PYTHONPYCACHEPREFIX``), as an installed package has its ``.pyc`` files; with
``--no-cache`` each import compiles shmstore's sources again, which is what a checkout
run with ``PYTHONDONTWRITEBYTECODE=1`` pays at every start.

Run ``python bench/startup.py`` (``--runs N``, default 15).  The table goes to stdout.
"""

from __future__ import annotations

import argparse
import atexit
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.managers import SyncManager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import shmstore  # noqa: E402

IMPORTS = {
    "from shmstore import connect": "from shmstore import connect; connect",
    "connect(url) (SharedStore)":
        "import shmstore; shmstore.connect('unix:///nowhere.sock', authkey='00')",
    "server child modules":
        "import shmstore.server.process, shmstore.server.manager",
}
SERVER_PREFIX = "shmstore.server"


def import_cost(code: str) -> tuple[float, bool]:
    """Milliseconds of the outermost shmstore rows of ``-X importtime``; server code loaded?"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env,
                         capture_output=True, text=True, check=True).stderr
    rows = [line.split("|") for line in err.splitlines() if line.startswith("import time:")]
    total_us, server = 0, False
    # A module's row comes after its children's: read backwards, parents first, keeping
    # the chain of open ancestors and whether one of them is a shmstore module.
    chain: list[tuple[int, bool]] = []
    for _, cumulative, name in reversed(rows[1:]):  # rows[0] is the header
        depth = len(name) - len(name.lstrip())
        module = name.strip()
        while chain and chain[-1][0] >= depth:
            chain.pop()
        inside = bool(chain) and chain[-1][1]
        mine = module.startswith("shmstore")
        if mine and not inside:
            total_us += int(cumulative)
        server = server or module.startswith(SERVER_PREFIX)
        chain.append((depth, inside or mine))
    return total_us / 1000, server


def start_shmstore() -> float:
    """Seconds from ``serve()`` to a client's first completed save (shutdown untimed)."""
    started = time.perf_counter()
    with shmstore.serve(export=False) as server:
        with server.connect() as store:
            store.save(shmstore.Checkpoint(execution_id="e", state={"n": 1}))
            took = time.perf_counter() - started
    return took


def start_syncmanager() -> float:
    """Seconds from ``SyncManager.start()`` (spawn) to its first set dict item."""
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    started = time.perf_counter()
    manager.start()
    shared = manager.dict()
    shared["e"] = {"n": 1}
    took = time.perf_counter() - started
    manager.shutdown()
    return took


def _spread(values: list[float]) -> str:
    return f"{min(values) * 1000:.0f}..{max(values) * 1000:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--no-cache", action="store_true",
                        help="compile the sources at every import (no .pyc files)")
    args = parser.parse_args()
    if args.no_cache:
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    else:  # every child inherits it: the first run of each kind fills the cache
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        prefix = tempfile.mkdtemp(prefix="shmstore-bench-pyc-")
        atexit.register(shutil.rmtree, prefix, ignore_errors=True)
        os.environ["PYTHONPYCACHEPREFIX"] = prefix
    cache = "no .pyc (compiled at each import)" if args.no_cache else ".pyc cached"
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.runs} runs, "
          f"{cache}\n")
    print("| import | median ms | min..max ms | shmstore.server loaded |")
    print("|---|---:|---:|---|")
    for label, code in IMPORTS.items():
        import_cost(code)  # fills the bytecode cache (if any)
        costs = [import_cost(code) for _ in range(args.runs)]
        ms = [c for c, _ in costs]
        loaded = "yes" if any(s for _, s in costs) else "no"
        print(f"| {label} | {statistics.median(ms):.1f} | {min(ms):.1f}..{max(ms):.1f} "
              f"| {loaded} |")
    runs: dict[str, list[float]] = {"shmstore": [], "SyncManager": []}
    starters: dict[str, Callable[[], float]] = {"shmstore": start_shmstore,
                                                  "SyncManager": start_syncmanager}
    start_shmstore(), start_syncmanager()  # warm: the parent's own imports, page cache
    for _ in range(args.runs):
        for name, start in starters.items():
            runs[name].append(start())
    ratios = [a / b for a, b in zip(runs["shmstore"], runs["SyncManager"], strict=True)]
    print("\n| start to first save | median ms | min..max ms |")
    print("|---|---:|---:|")
    for name, values in runs.items():
        print(f"| {name} | {statistics.median(values) * 1000:.0f} | {_spread(values)} |")
    print(f"\nshmstore / SyncManager, median of paired ratios: {statistics.median(ratios):.2f}"
          f" (range {min(ratios):.2f}..{max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
