"""Growth under load (issue #3): server memory per checkpoint, and whether clear gives it back.

``--writers`` processes (spawn; default 4) save checkpoints of one size into a
``shmstore.serve()`` server for ``--seconds`` (or until ``--max-bytes`` of payload are
stored, whichever comes first).  The same number of checkpoints, of the same bytes, then
go into the alternatives, in the same run, written by as many writer processes:

- shmstore: ``SharedStore.save`` of a ``Checkpoint`` whose state encodes to the size;
  the server keeps the msgpack bytes of the state plus the record's header;
- redis: a private ``redis-server`` (``--save "" --appendonly no``, loopback, a free port,
  a temporary directory), one key per checkpoint (its 36-character id) holding the same
  msgpack bytes; memory is ``used_memory_rss`` from ``INFO memory``;
- syncmgr: a ``SyncManager().dict()`` with the same keys and bytes; memory is the manager
  process's RSS (psutil).

Reported per system: RSS before the fill (the baseline), after it, the growth per payload
byte (RSS growth over the baseline divided by the payload bytes held), the growth per
checkpoint, and the RSS once everything is cleared.  Then the shmstore server is filled
and cleared ``--cycles`` times (the first fill is cycle 1; the later ones store exactly as
many checkpoints): the peak RSS of each fill, and the last's ratio to the first's, tell
whether memory freed by ``clear`` is reused or leaks.  A last table estimates where a
shmstore record's bytes go (``sys.getsizeof`` on a record built as the server builds it).

Targets (PASS/FAIL printed): growth per payload byte <= 1.5x for 1 KiB states and
<= 1.05x for 64 KiB states; the last fill's peak within 10% of the first's.

Run ``python bench/memory_growth.py`` (``--size 64KiB``, ``--size 1KiB,64KiB`` for both,
``--quick`` for a short run).  The markdown tables go to stdout and to
``bench/results/memory_growth.md`` (one section per size: a run replaces the sections of
the sizes it measured and keeps the others); ``bench/results/memory_growth.png`` shows
this run's sizes, one row each: RSS growth against checkpoints stored, per system (left),
and the peak RSS of each fill cycle (right).  Redis is skipped, with the reason printed,
when ``redis-server`` or redis-py is missing.

``--growing`` runs the growing-states scenario instead (issue 15): ``--writers`` writers
(spawned) save states growing from 1 KiB to 1 MiB over ``--seconds`` on the socket path
(so every byte is in the server's heap), each at 2 MiB/s, and writer-2 also keeps every
state it made (the planted leak).  Each round runs a server with its malloc arenas capped
(the default) and one with glibc's default (``MALLOC_ARENA_MAX`` = 8 per core), in turn:
reported are the server's RSS growth against its heap payload, its growth verdict, and
how many seconds after the writers started `shmstore doctor`'s diagnosis named the
leaker and only it (``bench/results/memory_growing.md``).  Run ``python
bench/memory_growth.py --growing --seconds 30``.

Bounded for a small machine: at most ``--writers`` processes, each stopping at its own
deadline and at its share of ``--max-bytes``; every process this script starts is reaped
and every server stopped on the way out, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import multiprocessing
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.managers import SyncManager
from typing import Any

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shmstore
from shmstore import Checkpoint
from shmstore.core.checkpoint import new_id
from shmstore.core.codec import DEFAULT_CODEC
from shmstore.core.record import Record

SIZES = {"1KiB": 1024, "64KiB": 64 * 1024}
#: Target for RSS growth per payload byte, per state size.
TARGETS = {"1KiB": 1.5, "64KiB": 1.05}
#: The last fill's peak RSS may differ from the first's by this fraction at most.
CYCLE_DRIFT = 0.10
MiB = 1024 * 1024
MAX_WRITERS = 32
SAMPLE_INTERVAL = 0.1     # seconds between memory samples during a fill
# Seconds before a before/after reading: Redis updates its RSS figure in its cron, and the
# shmstore server hands freed heap back at its next memory sample (every 0.5 s).
SETTLE = 1.2
START_TIMEOUT = 60.0      # for a writer to connect, and for redis-server to answer
CHUNK = {"shmstore": 32, "redis": 100, "syncmgr": 100}  # writes between stop checks
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NODE = "fill"


def make_state(size: int) -> dict[str, Any]:
    """A dict state whose msgpack encoding is exactly ``size`` bytes."""
    for pad in range(max(0, size - 48), size + 1):
        state = {"step": 7, "node": "transform", "text": "x" * pad}
        if len(DEFAULT_CODEC.encode(state)) == size:
            return state
    raise ValueError(f"no state encodes to exactly {size} bytes")


def parse_bytes(text: str) -> int:
    """``512MiB``, ``1GiB``, ``65536`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB)")
    scale = {"B": 1, "KiB": 1024, "MiB": MiB, "GiB": 1024 * MiB}[m.group(2) or "B"]
    return int(m.group(1)) * scale


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


# ------------------------------------------------------------------------------ writers


@dataclass(frozen=True)
class WriterJob:
    """What one writer process does: where to write, how much, for how long."""

    system: str           # "shmstore" | "redis" | "syncmgr"
    target: Any           # (url, authkey) | (host, port) | a DictProxy
    index: int
    size: int
    quota: int            # checkpoints at most
    seconds: float        # and for this long at most


def _putter(job: WriterJob) -> tuple[Callable[[int], None], Callable[[], None]]:
    """Return ``put(n)``, which writes n checkpoints, and ``close()``."""
    state = make_state(job.size)
    if job.system == "shmstore":
        url, authkey = job.target
        store = shmstore.SharedStore(url, authkey=authkey)
        execution = f"writer-{job.index}"

        def put_shm(n: int) -> None:
            for _ in range(n):
                store.save(Checkpoint(execution_id=execution, node_name=NODE, state=state))

        store.latest(execution)  # connect before the clock starts
        return put_shm, store.close
    payload = DEFAULT_CODEC.encode(state)
    if job.system == "redis":
        import redis

        host, port = job.target
        client = redis.Redis(host=host, port=port)
        client.ping()

        def put_redis(n: int) -> None:
            pipe = client.pipeline(transaction=False)
            for _ in range(n):
                pipe.set(new_id(), payload)
            pipe.execute()

        return put_redis, client.close
    proxy = job.target
    len(proxy)  # connect before the clock starts

    def put_dict(n: int) -> None:
        # A copy per entry: pickle would send one object repeated n times as one object.
        proxy.update({new_id(): payload[:1] + payload[1:] for _ in range(n)})

    return put_dict, lambda: None


def _writer(job: WriterJob, events: Any, go: Any, stop: Any) -> None:
    """Body of a writer process: connect, wait for ``go``, write until a bound is hit."""
    # The parent owns Ctrl-C: it sets `stop`, then reaps us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    written = 0
    try:
        put, close = _putter(job)
        events.put(("ready", job.index))
        if go.wait(START_TIMEOUT):
            chunk = CHUNK[job.system]
            deadline = time.monotonic() + job.seconds
            while written < job.quota and time.monotonic() < deadline and not stop.is_set():
                n = min(chunk, job.quota - written)
                put(n)
                written += n
        close()
    except Exception as exc:
        events.put(("failed", job.index, f"{type(exc).__name__}: {exc}"))
        raise
    events.put(("done", job.index, written))


def _reap(procs: list[Any]) -> None:
    """Join writer processes; terminate, then kill, those that do not end."""
    for proc in procs:
        proc.join(5)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(2)
        if proc.is_alive():
            proc.kill()
            proc.join()


# ------------------------------------------------------------------------------ systems


class ShmSystem:
    """A ``shmstore.serve()`` server and a store on it for sampling and clearing."""

    name = "shmstore"

    def __init__(self) -> None:
        self.server = shmstore.serve(export=False)
        self.store = self.server.connect()
        self.target = (self.server.url, self.server.authkey)

    def sample(self) -> tuple[int, int, int]:
        """(checkpoints, payload bytes, RSS)."""
        st = self.store.stats()
        return st.checkpoints, st.payload_bytes, st.server_rss

    def clear(self) -> None:
        for execution in self.store.executions():
            self.store.clear(execution)

    def close(self) -> None:
        try:
            self.store.close()
        finally:
            self.server.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisSystem:
    """A private, non-persistent ``redis-server`` on a free loopback port."""

    name = "redis"

    def __init__(self, payload_len: int, exe: str) -> None:
        import redis

        self.payload_len = payload_len
        self.dir = tempfile.mkdtemp(prefix="shmstore-bench-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        for _attempt in range(3):  # a free port may be taken before redis binds it
            port = _free_port()
            self.proc = subprocess.Popen(
                [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self.dir, "--daemonize", "no",
                 "--logfile", os.path.join(self.dir, "redis.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C is ours; we stop it in `close`
            )
            self.client = redis.Redis(host="127.0.0.1", port=port)
            deadline = time.monotonic() + START_TIMEOUT
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    self.client.ping()
                    self.target = ("127.0.0.1", port)
                    self.pid = self.proc.pid
                    return
                except redis.ConnectionError:
                    time.sleep(0.05)
            self._stop_proc()
        shutil.rmtree(self.dir, ignore_errors=True)
        raise RuntimeError(f"redis-server did not start (log: {self.dir}/redis.log)")

    def sample(self) -> tuple[int, int, int]:
        n = int(self.client.dbsize())
        rss = int(self.client.info("memory")["used_memory_rss"])
        return n, n * self.payload_len, rss

    def clear(self) -> None:
        self.client.flushall(asynchronous=False)

    def _stop_proc(self) -> None:
        proc = self.proc
        if proc is None:
            return
        for action in (proc.terminate, proc.kill):
            if proc.poll() is None:
                action()
            try:
                proc.wait(5)
                break
            except subprocess.TimeoutExpired:
                continue

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self._stop_proc()
            shutil.rmtree(self.dir, ignore_errors=True)


class SyncManagerSystem:
    """A ``SyncManager().dict()`` in a spawned manager process."""

    name = "syncmgr"

    def __init__(self, payload_len: int, ctx: Any) -> None:
        self.payload_len = payload_len
        self.manager = SyncManager(ctx=ctx)
        self.manager.start()
        self.target = self.manager.dict()
        self.process = psutil.Process(self.manager._process.pid)  # type: ignore[attr-defined]

    def sample(self) -> tuple[int, int, int]:
        n = len(self.target)
        return n, n * self.payload_len, self.process.memory_info().rss

    def clear(self) -> None:
        self.target.clear()

    def close(self) -> None:
        self.manager.shutdown()


# -------------------------------------------------------------------------------- fills


@dataclass
class Fill:
    """One fill of one system: samples (seconds, checkpoints, payload, rss) and readings."""

    system: str
    baseline_rss: int
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    checkpoints: int = 0
    payload: int = 0
    rss: int = 0
    seconds: float = 0.0
    cleared_rss: int = 0
    stopped_by: str = ""

    @property
    def peak_rss(self) -> int:
        return max([self.rss, *(s[3] for s in self.samples)])

    @property
    def growth(self) -> int:
        return self.rss - self.baseline_rss


class Progress:
    """A rich progress bar per fill on stderr when rich is importable, else a line per fill."""

    def __init__(self) -> None:
        try:
            import rich.progress  # noqa: F401
        except ImportError:
            self.enabled = False
        else:
            self.enabled = True

    @contextlib.contextmanager
    def task(self, label: str, total: float) -> Iterator[Callable[[float, int, int], None]]:
        if not self.enabled:
            print(f"{label} ...", file=sys.stderr, flush=True)
            yield lambda done, count, rss: None
            return
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        bar = RichProgress(
            TextColumn("{task.description:<22}"), BarColumn(),
            TextColumn("{task.fields[count]:>9,} ckpt  RSS {task.fields[rss]:>10}"),
            TimeElapsedColumn(), console=Console(stderr=True),
        )
        with bar:
            tid = bar.add_task(label, total=total, count=0, rss="")

            def update(done: float, count: int, rss: int) -> None:
                bar.update(tid, completed=min(done, total), count=count, rss=mib(rss))

            yield update
            bar.update(tid, completed=total)


def run_fill(system: Any, *, ctx: Any, writers: int, size: int, quota: int,
             seconds: float, by_time: bool, label: str, progress: Progress) -> Fill:
    """Fill ``system`` with ``writers`` processes until ``quota`` checkpoints or ``seconds``.

    ``quota`` is split across the writers, so together they never write more; the
    progress bar follows the clock when ``by_time``, else the count.  Every writer is
    reaped before this returns, whatever happens.
    """
    time.sleep(SETTLE)
    count0, _, baseline = system.sample()
    fill = Fill(system.name, baseline)
    fill.samples.append((0.0, count0, 0, baseline))
    shares = [quota // writers + (1 if i < quota % writers else 0) for i in range(writers)]
    events, go, stop = ctx.Queue(), ctx.Event(), ctx.Event()
    procs = [
        ctx.Process(target=_writer, name=f"bench-writer-{i}", daemon=True,
                    args=(WriterJob(system.name, system.target, i, size, share, seconds),
                          events, go, stop))
        for i, share in enumerate(shares)
    ]
    written: dict[int, int] = {}
    try:
        for proc in procs:
            proc.start()
        ready = 0
        while ready < writers:
            try:
                msg = events.get(timeout=START_TIMEOUT)
            except queue.Empty:
                raise RuntimeError(f"writers not ready within {START_TIMEOUT} s") from None
            if msg[0] != "ready":
                raise RuntimeError(f"writer {msg[1]} failed to start: {msg[2]}")
            ready += 1
        with progress.task(label, seconds if by_time else quota) as update:
            t0 = time.monotonic()
            go.set()
            hard_stop = t0 + seconds + 30
            while any(p.is_alive() for p in procs):
                time.sleep(SAMPLE_INTERVAL)
                now = time.monotonic() - t0
                count, payload, rss = system.sample()
                fill.samples.append((now, count, payload, rss))
                update(now if by_time else count, count, rss)
                if time.monotonic() > hard_stop:
                    stop.set()
                    break
                while not events.empty():
                    msg = events.get()
                    if msg[0] == "failed":
                        raise RuntimeError(f"writer {msg[1]} failed: {msg[2]}")
                    written[msg[1]] = msg[2]
                if len(written) == writers:
                    break
            fill.seconds = time.monotonic() - t0
    finally:
        stop.set()
        go.set()  # a writer still waiting to start leaves at once
        _reap(procs)
        events.close()
    failed = [p.name for p in procs if p.exitcode not in (0, None)]
    if failed:
        raise RuntimeError(f"writers failed: {', '.join(failed)} (tracebacks above)")
    time.sleep(SETTLE)
    fill.checkpoints, fill.payload, fill.rss = system.sample()
    fill.checkpoints -= count0
    fill.samples.append((fill.seconds, count0 + fill.checkpoints, fill.payload, fill.rss))
    fill.stopped_by = "quota" if fill.checkpoints >= quota else "time"
    return fill


def clear(system: Any, fill: Fill) -> None:
    """Drop everything the system holds; note its RSS afterwards."""
    system.clear()
    time.sleep(SETTLE)
    count, _, fill.cleared_rss = system.sample()
    if count:
        raise RuntimeError(f"{system.name} still holds {count} entries after clear")


# ----------------------------------------------------------------------- where it goes


def _allocated(nbytes: int) -> int:
    """What CPython's allocators hand out for an object of ``nbytes`` (64-bit Linux).

    pymalloc (objects up to 512 bytes) rounds to 16; glibc malloc adds its 8-byte chunk
    header and rounds to 16.
    """
    if nbytes <= 512:
        return -(-nbytes // 16) * 16
    return -(-(nbytes + 8) // 16) * 16


def record_breakdown(size: int, checkpoints: int,
                     executions: int) -> list[tuple[str, float, float]]:
    """Bytes per stored shmstore record by part: (part, sys.getsizeof, allocated).

    The record is built as the server builds it: a save request packed by the client and
    unpacked by the server (so every string and bytes object is the server's own), then
    stored by a `CheckpointTable`.  Dict costs are for dicts of the fill's size.
    """
    from shmstore.backends.table import CheckpointTable
    from shmstore.backends.wire import pack, unpack

    state = make_state(size)
    cp = Checkpoint(execution_id="writer-0", node_name=NODE, state=state)
    record = shmstore.MemoryStore()._record(cp)
    _ident, _op, args, _kw = unpack(pack(("table", "save", (record, None), {})))
    table = CheckpointTable()
    table.save(Record._make(args[0]))  # as the server rebuilds it from the wire
    stored = table._records[args[0][0]]
    per_exec = max(1, checkpoints // max(1, executions))
    big_version = 1000 + per_exec  # a fill's versions are past the cached small ints
    parts: list[tuple[str, Any]] = [
        ("record tuple (8 fields)", stored),
        ("id str (36 chars; also the _records key)", stored[0]),
        ("version int (also the versions key)", big_version),
        ("timestamp int (µs)", stored[4]),
        ("state bytes: object header", stored[7]),
    ]
    rows: list[tuple[str, float, float]] = []
    for name, obj in parts:
        n = sys.getsizeof(obj)
        if isinstance(obj, bytes) and len(obj) > 1:
            rows.append((name, n - len(obj), _allocated(n) - len(obj)))
        else:
            rows.append((name, n, _allocated(n)))
    # Shared or cached, so free per record: the execution id (one str per execution, the
    # index's), the node name (interned), parent None, metadata b"\x80" (CPython caches
    # 1-byte bytes objects).
    assert stored[5] is None and len(stored[6]) == 1
    assert stored[2] is sys.intern(NODE)
    # Dicts sized as in the fill: ids -> record (str keys), and version -> id per execution.
    records = dict.fromkeys(f"{i:036d}" for i in range(checkpoints))
    versions = dict.fromkeys(range(1000, 1000 + per_exec))
    for name, d, n in (("table._records entry (amortized)", records, checkpoints),
                       ("execution.versions entry (amortized)", versions, per_exec)):
        rows.append((name, sys.getsizeof(d) / n, sys.getsizeof(d) / n))
    return rows


# ------------------------------------------------------------------------------ reports


@dataclass
class SizeResult:
    label: str
    size: int
    fills: list[Fill]
    cycles: list[Fill]
    breakdown: list[tuple[str, float, float]]
    notes: list[str]
    header: str


def _ratio_text(fill: Fill) -> str:
    return f"{fill.growth / fill.payload:.3f}×" if fill.payload else "n/a"


def render(res: SizeResult) -> tuple[str, list[tuple[str, bool]]]:
    """The markdown section of one size, and the (target, passed) verdicts."""
    out = [f"## {res.label} states", "", res.header, ""]
    out += [
        "| system | checkpoints | payload | RSS before | RSS after fill | growth "
        "| growth / payload byte | growth / checkpoint | RSS after clear | fill |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in res.fills:
        per_ckpt = f.growth / f.checkpoints if f.checkpoints else float("nan")
        rate = f.checkpoints / f.seconds if f.seconds else 0.0
        out.append(
            f"| {f.system} | {f.checkpoints:,} | {mib(f.payload)} | {mib(f.baseline_rss)} "
            f"| {mib(f.rss)} | {mib(f.growth)} | {_ratio_text(f)} | {per_ckpt:,.0f} B "
            f"| {mib(f.cleared_rss)} | {f.seconds:.1f} s ({rate:,.0f}/s) |"
        )
    out += ["", f"shmstore fill-and-clear cycles ({len(res.cycles)}, "
                f"{res.cycles[0].checkpoints:,} checkpoints each):", ""]
    out += ["| cycle | checkpoints | peak RSS | × cycle 1 | RSS after clear |",
            "|---:|---:|---:|---:|---:|"]
    first = res.cycles[0].peak_rss
    for i, c in enumerate(res.cycles, 1):
        out.append(f"| {i} | {c.checkpoints:,} | {mib(c.peak_rss)} | {c.peak_rss / first:.3f} "
                   f"| {mib(c.cleared_rss)} |")
    shm = res.fills[0]
    verdicts: list[tuple[str, bool]] = []
    lines = ["", "| target | measured | result |", "|---|---:|---|"]
    target = TARGETS.get(res.label)
    if target is not None and shm.payload:
        value = shm.growth / shm.payload
        ok = value <= target
        verdicts.append((f"{res.label} RSS per payload byte", ok))
        lines.append(f"| shmstore RSS growth per payload byte, {res.label} states ≤ {target}× "
                     f"| {value:.3f}× | {'PASS' if ok else 'FAIL'} |")
    drift = res.cycles[-1].peak_rss / first
    ok = abs(drift - 1) <= CYCLE_DRIFT
    verdicts.append((f"{res.label} cycle {len(res.cycles)} peak vs cycle 1", ok))
    lines.append(f"| peak RSS of fill {len(res.cycles)} within {CYCLE_DRIFT:.0%} of fill 1 "
                 f"| {drift:.3f}× | {'PASS' if ok else 'FAIL'} |")
    out += lines
    if res.breakdown:
        size_total = sum(r[1] for r in res.breakdown)
        alloc_total = sum(r[2] for r in res.breakdown)
        out += ["", "Where a shmstore record's bytes go besides the payload (`sys.getsizeof`; "
                    "allocated = rounded as pymalloc and glibc malloc hand it out):", "",
                "| part | getsizeof B/record | allocated B/record |", "|---|---:|---:|"]
        out += [f"| {name} | {n:,.0f} | {a:,.0f} |" for name, n, a in res.breakdown]
        measured = shm.growth / shm.checkpoints - res.size if shm.checkpoints else 0
        out += [f"| **sum** | **{size_total:,.0f}** | **{alloc_total:,.0f}** |",
                f"| measured: RSS growth per checkpoint − payload | | {measured:,.0f} |",
                f"| unexplained (fragmentation, free lists, buffers) | "
                f"| {measured - alloc_total:,.0f} |"]
    if res.notes:
        out += ["", *[f"- {n}" for n in res.notes]]
    return "\n".join(out) + "\n", verdicts


MD_TITLE = """# Growth under load

`bench/memory_growth.py` (issue #3): server RSS against the payload held, for shmstore,
Redis and a SyncManager dict holding the same checkpoints, and shmstore's peak RSS over
repeated fill-and-clear cycles.  One section per state size; a run replaces the sections
of the sizes it measured.
"""


def write_markdown(path: str, sections: dict[str, str]) -> None:
    """Merge this run's sections into ``path`` (sections of other sizes are kept)."""
    old: dict[str, str] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        for m in re.finditer(r"<!-- size (\S+) -->\n(.*?)<!-- end \1 -->\n", text, re.S):
            old[m.group(1)] = m.group(2)
    old.update(sections)
    parts = [MD_TITLE]
    for label in sorted(old, key=lambda k: SIZES.get(k, 0)):
        parts.append(f"<!-- size {label} -->\n{old[label]}<!-- end {label} -->\n")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(parts))


def write_png(path: str, results: list[SizeResult]) -> str | None:
    """Draw the figure; return why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no PNG: matplotlib is not importable ({exc})"
    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.2 * len(results)), squeeze=False)
    colors = {"shmstore": "tab:blue", "redis": "tab:red", "syncmgr": "tab:green"}
    for row, res in zip(axes, results, strict=True):
        left, right = row
        for f in res.fills:
            xs = [s[1] - f.samples[0][1] for s in f.samples]
            ys = [(s[3] - f.baseline_rss) / MiB for s in f.samples]
            left.plot(xs, ys, label=f"{f.system} ({_ratio_text(f)} payload)",
                      color=colors.get(f.system))
        n = res.fills[0].checkpoints
        left.plot([0, n], [0, n * res.size / MiB], "k--", lw=1, label="payload")
        target = TARGETS.get(res.label)
        if target is not None:
            left.plot([0, n], [0, target * n * res.size / MiB], "k:", lw=1,
                      label=f"target {target}× payload")
        left.set_title(f"{res.label} states: RSS growth during the fill")
        left.set_xlabel("checkpoints stored")
        left.set_ylabel("RSS above the system's baseline (MiB)")
        left.legend(fontsize=8)
        left.grid(alpha=0.3)
        cycles = list(range(1, len(res.cycles) + 1))
        peaks = [c.peak_rss / MiB for c in res.cycles]
        right.plot(cycles, peaks, "o-", color=colors["shmstore"], label="peak RSS of the fill")
        right.plot(cycles, [c.cleared_rss / MiB for c in res.cycles], "s--", color="tab:gray",
                   label="RSS after clear")
        right.axhspan(peaks[0] * (1 - CYCLE_DRIFT), peaks[0] * (1 + CYCLE_DRIFT),
                      color=colors["shmstore"], alpha=0.1, label=f"±{CYCLE_DRIFT:.0%} of fill 1")
        right.set_title(f"{res.label} states: shmstore server over fill-and-clear cycles")
        right.set_xlabel("fill cycle")
        right.set_ylabel("server RSS (MiB)")
        right.set_ylim(bottom=0)
        right.set_xticks(cycles)
        right.legend(fontsize=8)
        right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------- main


def redis_unavailable() -> str | None:
    """Why Redis cannot be measured, or None."""
    if shutil.which("redis-server") is None:
        return "redis-server is not on PATH (apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed (pip install redis)"
    return None


def measure_size(label: str, args: argparse.Namespace, ctx: Any, progress: Progress,
                 resources: contextlib.ExitStack) -> SizeResult:
    """Every fill of one state size; each server is stopped through ``resources``."""
    size = SIZES[label]
    notes: list[str] = []
    budget = max(args.writers, args.max_bytes // size)
    guard = max(120.0, 20 * args.seconds)  # bounds the count-driven fills in time
    common = {"ctx": ctx, "writers": args.writers, "size": size, "progress": progress}

    shm = ShmSystem()
    resources.callback(shm.close)
    first = run_fill(shm, quota=budget, seconds=args.seconds, by_time=True,
                     label=f"{label} shmstore fill 1", **common)
    clear(shm, first)
    n = first.checkpoints
    if first.stopped_by == "quota":
        notes.append(f"the shmstore fill stopped at the payload budget ({mib(args.max_bytes)}) "
                     f"after {first.seconds:.1f} s, before --seconds {args.seconds:g}")
    fills = [first]

    reason = "--no-redis" if args.no_redis else redis_unavailable()
    if reason is None:
        red = RedisSystem(size, shutil.which("redis-server") or "redis-server")
        resources.callback(red.close)
        fills.append(run_fill(red, quota=n, seconds=guard, by_time=False,
                              label=f"{label} redis", **common))
        clear(red, fills[-1])
        red.close()
    else:
        notes.append(f"Redis skipped: {reason}")
        print(f"Redis skipped: {reason}", file=sys.stderr)

    mgr = SyncManagerSystem(size, ctx)
    resources.callback(mgr.close)
    fills.append(run_fill(mgr, quota=n, seconds=guard, by_time=False,
                          label=f"{label} syncmgr", **common))
    clear(mgr, fills[-1])
    mgr.close()

    cycles = [first]
    for i in range(2, args.cycles + 1):
        cycle = run_fill(shm, quota=n, seconds=guard, by_time=False,
                         label=f"{label} shmstore fill {i}", **common)
        clear(shm, cycle)
        cycles.append(cycle)
    shm.close()

    short = [f.system for f in [*fills, *cycles] if f.checkpoints != n]
    if short:
        notes.append(f"unequal counts: {', '.join(short)} stored fewer than {n:,} (time guard)")
    notes.append("payload: the msgpack bytes of each state, identical in every system; "
                 "shmstore also keeps each record's header (id, execution, node, version, "
                 "timestamp, parent, metadata), Redis and the dict a 36-character id key")
    header = (f"{args.writers} writer processes, {size:,} B states; shmstore fill "
              f"{args.seconds:g} s at most (payload budget {mib(args.max_bytes)}), then "
              f"{n:,} checkpoints into each system; {datetime.date.today()}, python "
              f"{sys.version.split()[0]}, {os.cpu_count()} cores, "
              f"{mib(psutil.virtual_memory().total)} RAM")
    breakdown = record_breakdown(size, n, args.writers) if n else []
    return SizeResult(label, size, fills, cycles, breakdown, notes, header)


# ------------------------------------------------------------- growing states, planted leak

GROWING_MAX = 1024 * 1024  # states grow from 1 KiB to this over the run
GROWING_RATE = 2 * MiB  # bytes each writer saves per second (paced: a steady workload)
LEAKER = 2  # the writer that keeps every state it made


def _growing_writer(store: Any, index: int, leak: bool, seconds: float, quota: int,
                    started: Any, stop: Any) -> None:
    """Save states growing from 1 KiB to `GROWING_MAX` over ``seconds`` (or until
    ``quota`` bytes); the leaker also keeps every one."""
    store.name = f"writer-{index}"
    kept = []
    written = 0
    with store:
        t0 = time.monotonic()
        started.set()
        while not stop.is_set() and written < quota:
            elapsed = time.monotonic() - t0
            if elapsed > seconds:
                break
            size = int(1024 + (GROWING_MAX - 1024) * min(1.0, elapsed / seconds))
            state = {"i": index, "blob": os.urandom(64) * (size // 64)}
            store.save(Checkpoint(execution_id=f"grow-{index}", state=state))
            written += size
            if leak:
                kept.append(state)
            ahead = written / GROWING_RATE - (time.monotonic() - t0)
            if ahead > 0:
                stop.wait(ahead)  # pacing, not synchronisation: a steady rate
        stop.wait()  # stay registered (and alive) until the run is read


def growing_run(ctx: Any, *, capped: bool, writers: int, seconds: float,
                max_bytes: int) -> dict[str, Any]:
    """One run: a server (arenas capped, or glibc's default), ``writers`` writers with
    growing states on the socket path (every byte in the server's heap), one leaking.

    Returns the server's RSS growth against its payload, its verdict, and how long the
    doctor took to name the leaker alone."""
    from shmstore.monitor.doctor import diagnose
    from shmstore.monitor.recorder import MemoryRecorder

    saved = os.environ.get("MALLOC_ARENA_MAX")
    if capped:
        os.environ.pop("MALLOC_ARENA_MAX", None)
    else:  # glibc's own default on this machine: 8 arenas per core
        os.environ["MALLOC_ARENA_MAX"] = str(8 * (os.cpu_count() or 1))
    try:
        server = shmstore.serve(export=False)
    finally:
        if saved is None:
            os.environ.pop("MALLOC_ARENA_MAX", None)
        else:
            os.environ["MALLOC_ARENA_MAX"] = saved
    stop = ctx.Event()
    started = [ctx.Event() for _ in range(writers)]
    procs = [ctx.Process(target=_growing_writer,
                         args=(server.connect(data_plane=False), i, i == LEAKER, seconds,
                               max_bytes // writers, started[i], stop))
             for i in range(writers)]
    try:
        with server.connect(name="shmstore-doctor", role="monitor") as store:
            base = store.stats().server_rss
            for proc in procs:
                proc.start()
            if not all(e.wait(START_TIMEOUT) for e in started):
                raise RuntimeError("a writer did not start")
            t0 = time.monotonic()
            named = None
            verdicts: dict[str, str] = {}
            leaker = procs[LEAKER].pid
            while time.monotonic() - t0 < seconds:
                d = diagnose(MemoryRecorder(store, trend=100_000),
                             exclude_pids=frozenset({os.getpid()}))
                if named is None and [f.pid for f in d.leaking] == [leaker]:
                    named = time.monotonic() - t0
                stop.wait(0.5)
            d = diagnose(MemoryRecorder(store, trend=100_000),
                         exclude_pids=frozenset({os.getpid()}))
            verdicts = {f.who: f"{f.growth.verdict} {f.growth.per_minute / MiB:+.1f} MiB/min"
                        for f in d.clients if "writer" in f.who}
            stats = store.stats()
            return {"arenas": stats.malloc_arenas, "payload": stats.heap_payload_bytes,
                    "rss_growth": stats.server_rss - base,
                    "ratio": (stats.server_rss - base) / max(1, stats.heap_payload_bytes),
                    "server": d.server.growth.verdict if d.server else "?",
                    "leaking": [f.who for f in d.leaking], "named_after": named,
                    "verdicts": verdicts}
    finally:
        stop.set()
        _reap(procs)
        server.shutdown()


def growing_scenario(args: argparse.Namespace, ctx: Any) -> str:
    """Capped and uncapped arenas, interleaved, ``args.rounds`` each; a markdown table."""
    runs: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        for capped in (True, False):
            print(f"growing states, arenas {'capped' if capped else 'glibc default'} ...",
                  file=sys.stderr, flush=True)
            runs.append(growing_run(ctx, capped=capped, writers=args.writers,
                                    seconds=args.seconds, max_bytes=args.max_bytes))
    lines = [f"Growing states (1 KiB to {GROWING_MAX // 1024} KiB over {args.seconds:g} s, "
             f"{args.writers} writers on the socket path, writer-{LEAKER} keeping every "
             "state it made; `python bench/memory_growth.py --growing`):", "",
             "| arenas | heap payload | server RSS growth | ÷ payload | server verdict | "
             "leak named alone after | writers at the end |", "|---|---:|---:|---:|---|---:|---|"]
    for r in runs:
        named = "—" if r["named_after"] is None else f"{r['named_after']:.1f} s"
        writers = "; ".join(f"{who.split('/')[1]} {v}" for who, v in sorted(
            r["verdicts"].items(), key=lambda kv: kv[0].split("/")[1]))
        lines.append(f"| {r['arenas']} | {mib(r['payload'])} | {mib(r['rss_growth'])} | "
                     f"{r['ratio']:.2f}x | {r['server']} | {named} | {writers} |")
    return "\n".join(lines)


def _interrupt_once(signum: int, frame: Any) -> None:
    """The first Ctrl-C interrupts; later ones are ignored so that cleanup runs to the end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1KiB",
                        help=f"state size(s), comma-separated: {', '.join(SIZES)}")
    parser.add_argument("--writers", type=int, default=4, help="writer processes (default 4)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="length of the shmstore fill (default 10)")
    parser.add_argument("--max-bytes", type=parse_bytes, default=512 * MiB,
                        help="payload budget of a fill (default 512MiB)")
    parser.add_argument("--cycles", type=int, default=10, help="fill-and-clear cycles (10)")
    parser.add_argument("--quick", action="store_true", help="2 s fill, 3 cycles")
    parser.add_argument("--no-redis", action="store_true", help="leave Redis out")
    parser.add_argument("--out-dir", default=OUT_DIR, help="where the .md and .png go")
    parser.add_argument("--growing", action="store_true",
                        help="the growing-states scenario instead: arenas capped against "
                        "glibc's default, a planted leak, how soon the doctor names it")
    parser.add_argument("--rounds", type=int, default=2,
                        help="--growing: runs of each arena setting, interleaved (2)")
    args = parser.parse_args()
    if args.growing:
        text = growing_scenario(args, multiprocessing.get_context("spawn"))
        print(text)
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "memory_growing.md"), "w") as f:
            f.write(text + "\n")
        return 0
    labels = [s.strip() for s in args.size.split(",") if s.strip()]
    for label in labels:
        if label not in SIZES:
            parser.error(f"--size {label!r}: choose from {', '.join(SIZES)}")
    if not 1 <= args.writers <= MAX_WRITERS:
        parser.error(f"--writers must be 1..{MAX_WRITERS}")
    if args.quick:
        args.seconds, args.cycles = min(args.seconds, 2.0), min(args.cycles, 3)
    if not 0 < args.seconds <= 600:
        parser.error("--seconds must be in (0, 600]")
    if not 2 <= args.cycles <= 50:
        parser.error("--cycles must be 2..50")
    if args.max_bytes < max(SIZES[label] for label in labels):
        parser.error("--max-bytes is smaller than one state")

    ctx = multiprocessing.get_context("spawn")
    progress = Progress()
    results: list[SizeResult] = []
    signal.signal(signal.SIGINT, _interrupt_once)
    try:
        for label in labels:
            # Closing the stack stops every server of this size, on any way out.
            with contextlib.ExitStack() as resources:
                results.append(measure_size(label, args, ctx, progress, resources))
    except KeyboardInterrupt:
        print("interrupted: every writer was reaped and every server stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    sections: dict[str, str] = {}
    verdicts: list[tuple[str, bool]] = []
    for res in results:
        text, v = render(res)
        sections[res.label] = text
        verdicts += v
        print(text)
    os.makedirs(args.out_dir, exist_ok=True)
    write_markdown(os.path.join(args.out_dir, "memory_growth.md"), sections)
    why = write_png(os.path.join(args.out_dir, "memory_growth.png"), results)
    if why:
        print(why, file=sys.stderr)
    for name, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
