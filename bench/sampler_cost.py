"""What the server's memory sampler costs the store: throughput with it on and off (issue #3).

A ``shmstore.serve()`` server runs a `MemoryMonitor` thread that samples the server's RSS
and USS, every registered client's RSS and the table's figures every
``monitor_interval`` seconds.  This measures, in the same run, `SharedStore` ``save`` and
``load`` throughput against servers that differ only in that interval:

- off: ``monitor_interval=1e6`` (one sample at start, then none for 11 days);
- default: ``monitor_interval=0.5`` (what every server runs);
- stress: ``monitor_interval=0.01`` (50 times the default rate).

Each block starts a fresh server with one interval, fills it with ``--prefill``
checkpoints of ``--size`` (so the sampler reads a process of realistic size), lets
``--clients`` idle client processes register (the sampler reads each one's RSS too), and
then runs closed-loop ``save`` for ``--seconds``, then ``load`` for ``--seconds``, from one
client.  A round is one block per interval, in a shuffled order; ``--rounds`` rounds.

Every process is pinned to one CPU, as in ``bench/ops.py`` (same reason: the wake-up
placement of two processes on a small shared machine moves a round trip by 3x), which
here is also the worst case for the sampler: its thread takes its CPU time from the very
CPU that serves the calls, so all of its cost shows up in throughput (``--no-pin`` to
measure the unpinned mix).

Reported: per interval and operation, the median over rounds of the throughput, the
median of the per-round ratio to "off" in the same round (paired, so that slow drift of
the machine cancels) with its range, median and p99 latency; and, measured directly, the
time one ``MemoryMonitor.sample()`` takes on a table of the same size with as many
clients, as a fraction of each interval (its duty cycle: the upper bound of what it can
take from one CPU).

Target (PASS/FAIL printed): at the default interval, the sampler costs under 2% of
throughput (median paired ratio >= 0.98 for save and for load).

Run ``python bench/sampler_cost.py`` (``--quick`` for a short run).  The tables go to
stdout and to ``bench/results/sampler_cost.md``.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil

import shmstore
from shmstore import Checkpoint
from shmstore.backends.table import CheckpointTable
from shmstore.core.codec import DEFAULT_CODEC
from shmstore.core.record import Record
from shmstore.monitor.sampler import DEFAULT_INTERVAL, MemoryMonitor

#: label -> monitor_interval (seconds)
INTERVALS = {"off": 1e6, "default 0.5 s": DEFAULT_INTERVAL, "stress 0.01 s": 0.01}
TARGET_LABEL = "default 0.5 s"
TARGET_RATIO = 0.98
SIZES = {"100B": 100, "1KiB": 1024, "64KiB": 64 * 1024}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sampler_cost.md")
CLOCK = time.perf_counter
TITLE = "# Memory sampler cost (bench/sampler_cost.py)\n"
INTRO = ("SharedStore save and load throughput against servers that differ only in their "
         "memory sampler's interval (off, the default 0.5 s, a stress 0.01 s), one section "
         "per store size; the method is in the script's docstring.\n")


def make_state(size: int) -> dict[str, Any]:
    """A dict state whose msgpack encoding is about ``size`` bytes."""
    return {"step": 7, "node": "transform", "text": "x" * max(0, size - 30)}


def _idle_client(conn: Any, cpu: int | None) -> None:
    """A client process that registers with each server it is sent, then idles."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    store = None
    while True:
        msg = conn.recv()
        if store is not None:
            store.close()
            store = None
        if msg is None:
            return
        url, authkey = msg
        store = shmstore.SharedStore(url, authkey=authkey, name="idle")
        store.latest("idle")  # connects, so the server registers this pid
        conn.send("ok")


def pin_process(pid: int, cpu: int) -> None:
    """Pin every thread a process has now (threads made later inherit their creator's)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except ProcessLookupError:  # a thread that just ended
            pass


def closed_loop(fn: Callable[[], Any], seconds: float) -> list[float]:
    """Call ``fn`` back to back for ``seconds``; return each call's duration."""
    out = []
    end = CLOCK() + seconds
    t0 = CLOCK()
    while t0 < end:
        fn()
        t1 = CLOCK()
        out.append(t1 - t0)
        t0 = t1
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_block(interval: float, *, state: dict[str, Any], prefill: int, seconds: float,
              idle: list[Any], cpu: int | None) -> dict[str, Any]:
    """One server with this interval: prefill, register the idle clients, time save, load."""
    server = shmstore.serve(export=False, monitor_interval=interval)
    try:
        if cpu is not None:
            pin_process(server.pid, cpu)
        store = server.connect()
        try:
            for start in range(0, prefill, 100):
                store.save_many([Checkpoint(execution_id=f"fill-{i % 50}", state=state)
                                 for i in range(start, min(prefill, start + 100))])
            for conn in idle:
                conn.send((server.url, server.authkey))
            for conn in idle:
                if conn.recv() != "ok":
                    raise RuntimeError("an idle client failed to register")
            target = store.save(Checkpoint(execution_id="load", state=state))
            t0 = CLOCK()
            for _ in range(200):  # warm both paths
                store.save(Checkpoint(execution_id="save", state=state))
                store.load(target.id)
            # Checkpoints are made before the clock starts (enough for twice the warm-up's
            # rate; more are made on the fly only if the store turns out faster).
            need = int(seconds * 2 * 400 / (CLOCK() - t0)) + 1000
            pool = iter([Checkpoint(execution_id="save", state=state) for _ in range(need)])

            def next_cp() -> Checkpoint:
                cp = next(pool, None)
                return Checkpoint(execution_id="save", state=state) if cp is None else cp

            server_proc = psutil.Process(server.pid)
            cpu0 = server_proc.cpu_times()
            save = closed_loop(lambda: store.save(next_cp()), seconds)
            load = closed_loop(lambda: store.load(target.id), seconds)
            cpu1 = server_proc.cpu_times()
            samples = len(store.memory_history())
            # What one USS reading costs at this server's size (the kernel walks its pages).
            uss_read = statistics.median(closed_loop_n(server_proc.memory_full_info, 5))
            rss = server_proc.memory_info().rss
        finally:
            store.close()
    finally:
        server.shutdown()
    server_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    return {"save": save, "load": load, "server_cpu_per_op": server_cpu / (len(save) + len(load)),
            "samples": samples, "uss_read": uss_read, "rss": rss}


def time_sample(prefill: int, state: dict[str, Any], pids: list[int], n: int) -> dict[str, float]:
    """Median seconds of one `MemoryMonitor.sample()` on a table like the server's."""
    table = CheckpointTable()
    payload = DEFAULT_CODEC.encode(state)
    for i in range(prefill):
        table.save(Record(f"id-{i}", f"fill-{i % 50}", "node", 0, 0, None, b"\x80", payload))
    monitor = MemoryMonitor(table.figures)
    for pid in pids:
        monitor.register(pid, "idle")
    proc = psutil.Process()
    parts = {"sample()": monitor.sample, "  of which RSS (memory_info)": proc.memory_info,
             "  of which USS (memory_full_info)": proc.memory_full_info}
    out = {}
    for name, fn in parts.items():
        for _ in range(10):
            fn()
        out[name] = statistics.median(closed_loop_n(fn, n))
    return out


def closed_loop_n(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = CLOCK()
        fn()
        out.append(CLOCK() - t0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds (default 8)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="seconds of save, then of load, per block (default 2)")
    parser.add_argument("--size", choices=SIZES, default="1KiB", help="state size")
    parser.add_argument("--prefill", type=int, default=5000,
                        help="checkpoints stored before timing (default 5000)")
    parser.add_argument("--clients", type=int, default=4,
                        help="idle client processes the sampler also reads (default 4)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1 s")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to one CPU")
    parser.add_argument("--out", default=OUT, help="markdown results file")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 3, 1.0
    if not 1 <= args.rounds <= 100 or not 0 < args.seconds <= 60 or not 0 <= args.clients <= 32:
        parser.error("--rounds 1..100, --seconds (0, 60], --clients 0..32")

    pinned = not args.no_pin and hasattr(os, "sched_setaffinity")
    cpu = min(os.sched_getaffinity(0)) if pinned else None
    if cpu is not None:
        pin_process(os.getpid(), cpu)
    state = make_state(SIZES[args.size])
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for _ in range(args.clients):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_idle_client, args=(child, cpu), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)

    results: dict[str, list[dict[str, Any]]] = {label: [] for label in INTERVALS}
    started = time.monotonic()
    try:
        for r in range(args.rounds):
            order = list(INTERVALS.items())
            random.shuffle(order)
            for label, interval in order:
                results[label].append(run_block(interval, state=state, prefill=args.prefill,
                                                seconds=args.seconds, idle=pipes, cpu=cpu))
            print(f"round {r + 1}/{args.rounds} done ({time.monotonic() - started:.0f} s)",
                  file=sys.stderr, flush=True)
        sample_times = time_sample(args.prefill, state, [p.pid for p in procs if p.pid], 300)
    finally:
        for conn in pipes:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()

    lines = report(results, sample_times, args, pinned)
    text = "\n".join(lines) + "\n"
    print(text)
    save_section(args.out, f"{args.size} x {args.prefill}", text)
    return 0


def save_section(path: str, key: str, text: str) -> None:
    """Put ``text`` in the results file as the section ``key``, keeping the others."""
    begin, end = f"<!-- begin {key} -->\n", f"<!-- end {key} -->\n"
    try:
        with open(path, encoding="utf-8") as fh:
            old = fh.read()
    except FileNotFoundError:
        old = ""
    if not old.startswith(TITLE):
        old = TITLE + "\n" + INTRO + "\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + begin + text + end + rest.split(end, 1)[1]
    else:
        new = old + begin + text + end
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(new)


def report(results: dict[str, list[dict[str, Any]]], sample_times: dict[str, float],
           args: argparse.Namespace, pinned: bool) -> list[str]:
    """The markdown tables and the verdict."""
    argv: list[str] = []
    skip = False
    for a in sys.argv[1:]:  # the command as run, less where its output went
        if skip or a.startswith("--out"):
            skip = a == "--out"
            continue
        argv.append(a)
    cmd = " ".join(["python bench/sampler_cost.py", *argv])
    payload = args.prefill * SIZES[args.size] / 2**20
    lines = [
        f"## {args.size} states, {args.prefill:,} prefilled (≈ {payload:,.0f} MiB payload)",
        "",
        f"`{cmd}` — {datetime.date.today().isoformat()}, python {sys.version.split()[0]}, "
        f"{os.cpu_count()} cores, {'every process pinned to one CPU' if pinned else 'not pinned'}; "
        f"{args.rounds} rounds × {len(INTERVALS)} intervals (shuffled per round), "
        f"{args.seconds:g} s of save then {args.seconds:g} s of load per block, "
        f"{args.size} states, {args.prefill:,} checkpoints prefilled, "
        f"{args.clients} idle registered clients + the timing client.",
        "",
        "| interval | op | throughput (median) | × off, paired (median) | range over rounds "
        "| median µs | p99 µs | server CPU µs/op | samples/block | server RSS at end "
        "| one USS read |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for label in INTERVALS:
        for op in ("save", "load"):
            blocks = results[label]
            rates = [len(b[op]) / sum(b[op]) for b in blocks]
            off_rates = [len(b[op]) / sum(b[op]) for b in results["off"]]
            ratios = [a / b for a, b in zip(rates, off_rates, strict=True)]
            pooled = [x for b in blocks for x in b[op]]
            cpu_op = statistics.median(b["server_cpu_per_op"] for b in blocks) * 1e6
            samples = statistics.median(b["samples"] for b in blocks)
            rss = statistics.median(b["rss"] for b in blocks) / 2**20
            uss_ms = statistics.median(b["uss_read"] for b in blocks) * 1e3
            ratio = statistics.median(ratios)
            lines.append(
                f"| {label} | {op} | {statistics.median(rates):,.0f}/s | {ratio:.3f} | "
                f"{min(ratios):.3f}–{max(ratios):.3f} | {statistics.median(pooled) * 1e6:.1f} "
                f"| {pct(pooled, 0.99) * 1e6:.1f} | {cpu_op:.1f} | {samples:.0f} "
                f"| {rss:,.0f} MiB | {uss_ms:.1f} ms |")
            if label == TARGET_LABEL:
                verdicts.append((op, ratio))
    lines += [
        "",
        "One `MemoryMonitor.sample()`, timed directly in this process on a table of the same "
        f"size with {args.clients} registered clients (median of 300):",
        "",
        "| part | median µs | duty at 0.5 s | duty at 0.01 s |",
        "|---|---:|---:|---:|",
    ]
    for name, seconds in sample_times.items():
        lines.append(f"| {name} | {seconds * 1e6:.0f} | {seconds / 0.5:.3%} | "
                     f"{seconds / 0.01:.1%} |")
    lines += [
        "",
        "| target | measured | result |",
        "|---|---:|---|",
    ]
    for op, ratio in verdicts:
        ok = ratio >= TARGET_RATIO
        lines.append(f"| sampler at the default 0.5 s costs < 2% of {op} throughput "
                     f"(paired ratio ≥ {TARGET_RATIO}) | {ratio:.3f} | "
                     f"{'PASS' if ok else 'FAIL'} |")
    lines += [
        "",
        "- throughput: calls completed / seconds spent in them, per block; the median over "
        "rounds; `× off, paired`: each round's throughput over the same round's `off` "
        "block (ratios under 1 are a cost), median and range over rounds.",
        "- server CPU µs/op: the server process's CPU time (user + system, all threads) "
        "during the timed save and load, per call; the sampler's share is the difference "
        "from `off`.",
        "- duty: one sample's time over the interval — an upper bound of the CPU share the "
        "sampler can take.",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
