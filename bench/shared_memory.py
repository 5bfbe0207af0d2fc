"""Big array states: the data plane against the socket path and what a user would pick.

The state is a dict holding one float64 numpy array, at 64 KiB, 1 MiB, 16 MiB, 128 MiB
and 1 GiB (``--sizes``).  Contenders, in the same run, interleaved round by round:

- socket: ``SharedStore`` on a ``serve(data_plane=False)`` server (bytes on the unix
  socket);
- plane: ``SharedStore`` on a default ``serve()`` server, whose data plane is on: a load
  gives a read-only view of the shared pages;
- plane-copy: the same, loaded with ``copy=True`` (private, writable arrays);
- shm: ``multiprocessing.shared_memory`` by hand, copy in on save and copy out on load
  (what a user writes to be safe: a named segment, no store, leaks when killed);
- syncmgr: a ``SyncManager().dict()`` proxy (pickle both ways);
- redis: redis-py ``SET``/``GET`` of the array's bytes on a ``redis-server`` of the
  benchmark's own (unix socket), ``numpy.frombuffer`` on load;
- diskcache: ``diskcache.Cache`` in a directory on tmpfs (``/dev/shm``) when installed.

Reported:

1. save and load latency, median and spread (p10 to p90) per size, and each median as a
   ratio to the socket path's; ``load+read`` also sums the array, so the page faults a
   view pays on first touch are counted;
2. 8 spawned processes loading (and reading) the same checkpoint at once: total time, and
   the PSS and RSS they add in total (measured while all 8 hold it);
3. server RSS and USS against the payload after 8 states went in, through each plane;
4. the saving process's peak extra memory for one state (``VmHWM`` reset before the
   save, in a fresh spawned process).

Contenders that could not fit in this machine's available memory are skipped and say so.
No process is pinned: the readers' parallelism is part of what is measured.
Run ``python bench/shared_memory.py`` (``--quick`` for fewer rounds and sizes up to
128 MiB, ``--json FILE`` to keep the figures, ``--no-redis``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from multiprocessing.managers import SyncManager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy
import psutil
from _redis import start_redis  # bench/, first on sys.path when a script runs

import shmstore
from shmstore import Checkpoint

KIB, MIB, GIB = 1024, 1024**2, 1024**3
SIZES = {"64KiB": 64 * KIB, "1MiB": MIB, "16MiB": 16 * MIB, "128MiB": 128 * MIB,
         "1GiB": GIB}
READERS = 8
SERVER_STATES = 8
# How many times its size a contender needs, at most, in one loading process (received
# bytes, then the decoded array) and, for syncmgr, in the manager that pickles it per reader.
READER_FACTOR = {"socket": 2, "plane": 0, "plane-copy": 1, "shm": 1, "syncmgr": 4,
                 "redis": 2, "diskcache": 2}


STORES = ("socket", "plane", "plane-copy")


def _copy_in(array: numpy.ndarray[Any, Any]) -> shared_memory.SharedMemory:
    seg = shared_memory.SharedMemory(create=True, size=array.nbytes)
    numpy.ndarray(array.shape, array.dtype, buffer=seg.buf)[:] = array
    return seg


def _unlink(seg: shared_memory.SharedMemory) -> None:
    seg.close()
    seg.unlink()


def make_array(size: int, seed: int = 0) -> numpy.ndarray[Any, Any]:
    return numpy.random.default_rng(seed).random(size // 8)


class Contenders:
    """Every contender's save and load of one array state, and how a reader reaches it."""

    def __init__(self, ctx: Any, tmp: str, use_redis: bool) -> None:
        # A server each: the socket path's server trims its heap after big frees, and
        # that must not delay the plane's next request (or the other way round).
        self.server = shmstore.serve(export=False)
        self.plane = self.server.connect()
        self.socket_server = shmstore.serve(
            export=False, data_plane=False, limits={"max_checkpoint_bytes": 4 * GIB})
        self.socket = self.socket_server.connect()
        self.manager = SyncManager(ctx=ctx)
        self.manager.start()
        self.sync_dict = self.manager.dict()
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.redis: Any = None
        self.redis_sock = ""
        started = start_redis(tmp, "proto-max-bulk-len 2gb\nclient-query-buffer-limit 2gb\n"
                              ) if use_redis else None
        if use_redis and started is None:
            print("redis-server is not on PATH: Redis is left out", file=sys.stderr)
        if started is not None:
            import redis

            self.redis_proc, self.redis_sock = started
            self.redis = redis.Redis(unix_socket_path=self.redis_sock)
        self.cache: Any = None
        try:
            import diskcache  # type: ignore[import-untyped]
        except ImportError:
            print("diskcache is not installed: it is left out", file=sys.stderr)
        else:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else tmp
            self.cache_dir = tempfile.mkdtemp(prefix="shmstore-bench-dc-", dir=base)
            self.cache = diskcache.Cache(self.cache_dir, size_limit=2**40)  # default: 1 GB, evicts
        self.segments: dict[str, shared_memory.SharedMemory] = {}  # the kept ones, by name

    def names(self) -> list[str]:
        names = ["socket", "plane", "plane-copy", "shm", "syncmgr"]
        if self.redis is not None:
            names.append("redis")
        if self.cache is not None:
            names.append("diskcache")
        return names

    def store(self, name: str) -> Any:
        """The SharedStore of a store contender ("socket", "plane", "plane-copy")."""
        return self.socket if name == "socket" else self.plane

    # -- save: returns what undoes it, run off the clock ------------------------------------

    def save(self, name: str, array: numpy.ndarray[Any, Any], key: str
             ) -> Callable[[], None]:
        if name in STORES:
            store = self.store(name)
            cp = store.save(Checkpoint(execution_id=key, state={"weights": array}))
            return lambda: store.delete(cp.id)
        if name == "shm":
            seg = _copy_in(array)
            return lambda: _unlink(seg)
        if name == "syncmgr":
            self.sync_dict[key] = {"weights": array}
            return lambda: self.sync_dict.pop(key)
        if name == "redis":
            self.redis.set(key, array.tobytes())
            return lambda: self.redis.delete(key)
        self.cache.set(key, {"weights": array})
        return lambda: self.cache.delete(key)

    def keep(self, name: str, array: numpy.ndarray[Any, Any], key: str) -> Any:
        """Save once for loads; returns the handle a load (here or in a reader) needs."""
        if name in STORES:
            return self.store(name).save(
                Checkpoint(execution_id=key, state={"weights": array})).id
        if name == "shm":
            seg = _copy_in(array)
            self.segments[seg.name] = seg
            return (seg.name, array.shape)
        self.save(name, array, key)
        return key

    def drop_kept(self, name: str, handle: Any) -> None:
        if name in STORES:
            self.store(name).delete(handle)
        elif name == "shm":
            _unlink(self.segments.pop(handle[0]))
        elif name == "syncmgr":
            self.sync_dict.pop(handle)
        elif name == "redis":
            self.redis.delete(handle)
        else:
            self.cache.delete(handle)

    def reach(self, name: str) -> Any:
        """What a reader process needs to load from this contender (it pickles)."""
        if name in STORES:
            return self.store(name)
        if name == "syncmgr":
            return self.sync_dict
        if name == "redis":
            return self.redis_sock
        if name == "diskcache":
            return self.cache_dir
        return None

    def close(self) -> None:
        for seg in self.segments.values():
            _unlink(seg)
        self.segments.clear()
        if self.cache is not None:
            self.cache.close()
            shutil.rmtree(self.cache_dir, ignore_errors=True)
        if self.redis is not None:
            self.redis.close()
        if self.redis_proc is not None:
            self.redis_proc.terminate()
            self.redis_proc.wait(10)
        self.plane.close()
        self.socket.close()
        self.server.shutdown()
        self.socket_server.shutdown()
        self.manager.shutdown()


def load(name: str, reach: Any, handle: Any, redis_client: Any = None,
         cache: Any = None) -> numpy.ndarray[Any, Any]:
    """One load of the array by ``name``'s contender, in any process."""
    if name == "socket" or name == "plane":
        return reach.load(handle).state["weights"]  # type: ignore[no-any-return]
    if name == "plane-copy":
        return reach.load(handle, copy=True).state["weights"]  # type: ignore[no-any-return]
    if name == "shm":
        seg_name, shape = handle
        seg = shared_memory.SharedMemory(name=seg_name)
        try:
            return numpy.array(numpy.ndarray(shape, numpy.float64, buffer=seg.buf))
        finally:
            seg.close()
    if name == "syncmgr":
        return reach[handle]["weights"]  # type: ignore[no-any-return]
    if name == "redis":
        return numpy.frombuffer(redis_client.get(handle), numpy.float64)
    return cache.get(handle)["weights"]  # type: ignore[no-any-return]


def _untrack_shm() -> None:
    """Readers only attach: keep their resource tracker from unlinking the parent's segments
    (cpython gh-82300), as every hand-written shared_memory reader has to."""
    from multiprocessing import resource_tracker

    original = resource_tracker.register

    def register(name: str, rtype: str) -> None:
        if rtype != "shared_memory":
            original(name, rtype)
    resource_tracker.register = register  # type: ignore[assignment]


def _reader(name: str, reach: Any, handle: Any, ready: Any, start: Any, release: Any,
            out: Any) -> None:
    """Load and read the array once ``start`` is set; hold it until ``release``."""
    redis_client = cache = None
    if name == "redis":
        import redis

        redis_client = redis.Redis(unix_socket_path=reach)
        redis_client.ping()
    elif name == "diskcache":
        import diskcache

        cache = diskcache.Cache(reach)
    elif name == "shm":
        _untrack_shm()
    elif name in STORES:
        reach.stats()  # connected before the clock starts
    elif name == "syncmgr":
        len(reach)
    ready.put(os.getpid())
    start.wait(120)
    t0 = time.perf_counter()
    array = load(name, reach, handle, redis_client, cache)
    total = float(array.sum())  # every page read: the PSS that follows is the real one
    out.put((os.getpid(), time.perf_counter() - t0, total))
    release.wait(300)
    del array


def readers(ctx: Any, contenders: Contenders, name: str, handle: Any
            ) -> dict[str, float]:
    """READERS processes load one checkpoint at once: wall time, PSS and RSS they add."""
    ready, out = ctx.Queue(), ctx.Queue()
    start, release = ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=_reader, args=(name, contenders.reach(name), handle,
                                               ready, start, release, out))
             for _ in range(READERS)]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        before = {p.pid: psutil.Process(p.pid).memory_full_info() for p in procs}
        t0 = time.perf_counter()
        start.set()
        got: list[tuple[int, float, float]] = []
        while len(got) < len(procs):
            try:
                got.append(out.get(timeout=1.0))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(f"a {name} reader failed") from None
        wall = time.perf_counter() - t0
        after = {p.pid: psutil.Process(p.pid).memory_full_info() for p in procs}
        sums = {round(t, 3) for _, _, t in got}
        if len(sums) != 1:
            raise RuntimeError(f"{name} readers disagree on the array: {sums}")
    finally:
        release.set()
        for proc in procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
                proc.join()
    pids = list(before)
    return {
        "wall_s": wall,
        "reader_median_s": statistics.median(t for _, t, _ in got),
        "pss_added": float(sum(after[p].pss - before[p].pss for p in pids)),
        "rss_added": float(sum(after[p].rss - before[p].rss for p in pids)),
    }


def _peak_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _saver(size: int, store: Any, out: Any) -> None:
    """In a fresh process: the peak memory one save of a ``size`` array state adds."""
    array = make_array(size, seed=3)
    store.stats()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the RSS of now (Linux 4.0+)
    base = _peak_rss()
    cp = store.save(Checkpoint(execution_id="saver", state={"weights": array}))
    peak = _peak_rss()
    store.delete(cp.id)
    out.put(peak - base)


def saver_peak(ctx: Any, contenders: Contenders, size: int) -> dict[str, float]:
    figures = {}
    for name in ("socket", "plane"):
        out = ctx.Queue()
        store = contenders.socket if name == "socket" else contenders.plane
        proc = ctx.Process(target=_saver, args=(size, store, out))
        proc.start()
        try:
            figures[name] = float(out.get(timeout=300))
        finally:
            proc.join(60)
    return figures


def server_memory(size: int, count: int) -> dict[str, dict[str, Any]]:
    """RSS and USS a fresh server adds while it holds ``count`` states, per plane."""
    figures: dict[str, dict[str, Any]] = {}
    for name, plane in (("socket", False), ("plane", True)):
        with shmstore.serve(export=False) as server, \
                server.connect(data_plane=plane) as store:
            proc = psutil.Process(server.pid)
            warm = store.save(Checkpoint(execution_id="warm", state={"w": make_array(size)}))
            store.delete(warm.id)
            base = proc.memory_full_info()
            growth = []
            for i in range(count):
                store.save(Checkpoint(execution_id="held",
                                      state={"weights": make_array(size, seed=i)}))
                growth.append(proc.memory_info().rss - base.rss)
            now = proc.memory_full_info()
            stats = store.stats()
            figures[name] = {
                "payload": float(stats.payload_bytes),
                "segment_bytes": float(stats.segment_bytes),
                "rss_added": float(now.rss - base.rss),
                "uss_added": float(now.uss - base.uss),
                "rss_growth": [float(g) for g in growth],
            }
    return figures


def timed(fn: Callable[[], Any], undo: Callable[[Any], None] | None = None) -> float:
    t0 = time.perf_counter()
    got = fn()
    spent = time.perf_counter() - t0
    if undo is not None:
        undo(got)
    return spent


def spread(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    n = len(ordered)
    return (statistics.median(ordered), ordered[int(0.1 * (n - 1))],
            ordered[int(0.9 * (n - 1))])


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fits(name: str, size: int, copies: int) -> bool:
    need = copies * size * READER_FACTOR.get(name, 2) + 2 * size
    return need < 0.6 * psutil.virtual_memory().available


def latency(contenders: Contenders, label: str, size: int, rounds: int,
            results: dict[str, dict[str, list[float]]], skipped: list[str]) -> None:
    array = make_array(size)
    names = [n for n in contenders.names() if fits(n, size, 1)]
    skipped += [f"{label} latency {n}: needs more memory than this machine has free"
                for n in contenders.names() if n not in names]
    kept = {n: contenders.keep(n, array, f"k-{label}-{n}") for n in names}
    reps = max(1, min(20, 32 * MIB // size))
    rounds = rounds if size < GIB else min(rounds, 3)  # a 1 GiB round takes minutes
    redis_client, cache = contenders.redis, contenders.cache

    def one_load(n: str, read: bool) -> Callable[[], Any]:
        reach = contenders.reach(n)

        def run() -> Any:
            got = load(n, reach, kept[n], redis_client, cache)
            if read:
                got.sum()
        return run

    try:
        for n in names:  # warm every path once
            one_load(n, True)()
            if n != "plane-copy":
                contenders.save(n, array, f"w-{label}-{n}")()
        for _ in range(rounds):
            order = names[:]
            random.shuffle(order)
            for n in order:
                for _ in range(reps):
                    if n != "plane-copy":  # its save is the plane's
                        results.setdefault(f"{label} save", {}).setdefault(n, []).append(
                            timed(lambda: contenders.save(n, array, f"s-{label}-{n}"),
                                  lambda undo: undo()))
                    results.setdefault(f"{label} load", {}).setdefault(n, []).append(
                        timed(one_load(n, False)))
                    results.setdefault(f"{label} load+read", {}).setdefault(n, []).append(
                        timed(one_load(n, True)))
    finally:
        for n in names:
            contenders.drop_kept(n, kept[n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, up to 128MiB")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--sizes", help="comma-separated sizes (default: all that fit)")
    parser.add_argument("--reader-sizes", help="sizes for the 8-reader part "
                        "(default 128MiB,1GiB; --quick 16MiB,128MiB)")
    parser.add_argument("--no-redis", action="store_true", help="leave Redis out")
    args = parser.parse_args()
    rounds = 3 if args.quick else 7
    default_sizes = "64KiB,1MiB,16MiB,128MiB" if args.quick else ",".join(SIZES)
    sizes = (args.sizes or default_sizes).split(",")
    reader_sizes = (args.reader_sizes or
                    ("16MiB,128MiB" if args.quick else "128MiB,1GiB")).split(",")
    for label in [*sizes, *reader_sizes]:
        if label not in SIZES:
            parser.error(f"unknown size {label!r}: one of {', '.join(SIZES)}")

    ctx = multiprocessing.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="shmstore-bench-")
    contenders = Contenders(ctx, tmp, use_redis=not args.no_redis)
    results: dict[str, dict[str, list[float]]] = {}
    skipped: list[str] = []
    crowd: dict[str, dict[str, dict[str, float]]] = {}
    saver: dict[str, dict[str, float]] = {}
    try:
        for label in sizes:
            print(f"latency {label} ...", file=sys.stderr, flush=True)
            latency(contenders, label, SIZES[label], rounds, results, skipped)
        for label in reader_sizes:
            size = SIZES[label]
            array = make_array(size, seed=1)
            order = contenders.names()
            random.shuffle(order)
            for n in order:
                if not fits(n, size, READERS):
                    skipped.append(f"{label} {READERS} readers {n}: needs about "
                                   f"{fmt_bytes(READERS * size * READER_FACTOR[n])}, more "
                                   f"than this machine has free")
                    continue
                print(f"{READERS} readers {label} {n} ...", file=sys.stderr, flush=True)
                handle = contenders.keep(n, array, f"r-{label}-{n}")
                try:
                    crowd.setdefault(label, {})[n] = readers(ctx, contenders, n, handle)
                finally:
                    contenders.drop_kept(n, handle)
            del array
            print(f"saver peak {label} ...", file=sys.stderr, flush=True)
            saver[label] = saver_peak(ctx, contenders, size)
    finally:
        contenders.close()
        shutil.rmtree(tmp, ignore_errors=True)
    server_size = SIZES["16MiB" if args.quick else "128MiB"]
    print("server memory ...", file=sys.stderr, flush=True)
    server = server_memory(server_size, SERVER_STATES)

    summary: dict[str, Any] = {"latency": {}, "readers": crowd, "saver_peak": saver,
                               "server": server, "skipped": skipped}
    print(f"\nshmstore bench/shared_memory.py — python {sys.version.split()[0]}, "
          f"numpy {numpy.__version__}, {os.cpu_count()} cores, "
          f"{fmt_bytes(psutil.virtual_memory().total)} RAM, {rounds} interleaved rounds\n")
    print("Latency (median, p10–p90 in brackets; × socket = median ÷ the socket path's):\n")
    print("| size | op | contender | median | p10–p90 | × socket |")
    print("|---|---|---|---:|---:|---:|")
    for key, by_name in results.items():
        label, op = key.split(" ", 1)
        base = by_name.get("socket")
        base_med = statistics.median(base) if base else None
        for n in [n for n in contenders.names() if n in by_name]:
            med, p10, p90 = spread(by_name[n])
            ratio = med / base_med if base_med else float("nan")
            print(f"| {label} | {op} | {n} | {fmt_time(med)} | "
                  f"{fmt_time(p10)}–{fmt_time(p90)} | {ratio:.3g} |")
            summary["latency"][f"{key} {n}"] = {
                "median_s": med, "p10_s": p10, "p90_s": p90, "ratio_to_socket": ratio,
                "samples": len(by_name[n])}
    if crowd:
        print(f"\n{READERS} processes loading the same checkpoint at once, each reading "
              f"every element (PSS and RSS they add in total, while all hold it):\n")
        print("| size | contender | total time | one reader (median) | PSS added | "
              "RSS added |")
        print("|---|---|---:|---:|---:|---:|")
        for label, crowd_by_name in crowd.items():
            for n in [n for n in contenders.names() if n in crowd_by_name]:
                f = crowd_by_name[n]
                print(f"| {label} | {n} | {fmt_time(f['wall_s'])} | "
                      f"{fmt_time(f['reader_median_s'])} | {fmt_bytes(f['pss_added'])} | "
                      f"{fmt_bytes(f['rss_added'])} |")
    print(f"\nServer memory holding {SERVER_STATES} states of {fmt_bytes(server_size)} "
          f"(a fresh server each):\n")
    print("| path | payload | in segments | server RSS added | ÷ payload | "
          "server USS added |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, held in server.items():
        print(f"| {name} | {fmt_bytes(held['payload'])} | {fmt_bytes(held['segment_bytes'])} "
              f"| {fmt_bytes(held['rss_added'])} | {held['rss_added'] / held['payload']:.2%} | "
              f"{fmt_bytes(held['uss_added'])} |")
    if saver:
        print("\nPeak memory one save adds to the saving process (beyond the array):\n")
        print("| size | socket | plane |")
        print("|---|---:|---:|")
        for label, peak in saver.items():
            print(f"| {label} | {fmt_bytes(peak['socket'])} | {fmt_bytes(peak['plane'])} |")
    if skipped:
        print("\nSkipped:\n")
        for line in skipped:
            print(f"- {line}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
