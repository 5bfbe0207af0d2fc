"""``shmstore monitor`` and ``stats --json`` from the command line, and the monitor's API."""

from __future__ import annotations

import csv
import io
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmstore
from shmstore import Checkpoint
from shmstore.cli.main import main
from shmstore.core.stats import format_bytes
from shmstore.monitor.export import CSV_COLUMNS, write_csv, write_plot
from shmstore.monitor.recorder import ClientSample, MemoryRecorder, MemorySample
from shmstore.monitor.view import run_monitor

from .helpers import SPAWN, reap, reaped, wait_until

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def fast_server() -> Iterator[shmstore.StoreServer]:
    """A server that samples memory every 0.1 s, so a test sees many samples quickly."""
    srv = shmstore.serve(export=False, monitor_interval=0.1)
    yield srv
    srv.shutdown()


def _env(server: shmstore.StoreServer, **extra: str) -> dict[str, str]:
    # The key goes through the environment, as users are told to pass it: never argv.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "SHMSTORE_URL": server.url, "SHMSTORE_AUTHKEY": server.authkey.hex(), **extra}


def _cli(server: shmstore.StoreServer, *args: str, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "shmstore", *args], cwd=ROOT,
                            env=_env(server, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _run(server: shmstore.StoreServer, *args: str) -> tuple[int, str, str]:
    proc = _cli(server, *args)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        reap(proc)
    return proc.returncode, out, err


def _read_until(proc: subprocess.Popen[str], needle: str, timeout: float = 30) -> str:
    """Read the child's stdout until ``needle`` shows up (or fail with what was read)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while needle.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} in the monitor's output: {seen[-2000:]!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"the monitor ended before printing {needle!r}: {seen[-2000:]!r}"
            seen += chunk
    return seen.decode(errors="replace")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        return list(reader)


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, after checking its signature, IHDR and IEND chunks."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND"
    width, height = struct.unpack(">II", data[16:24])
    from PIL import Image  # matplotlib's own dependency: present wherever it is

    with Image.open(path) as image:
        image.verify()  # decodes every chunk, checks the CRCs
    return width, height


def _hog(url: str, authkey: str, ready: Any, go: Any, done: Any) -> None:
    store = shmstore.connect(url, authkey=authkey, name="hog")
    store.latest("hog")  # the first call registers this process with the server
    ready.set()
    go.wait(30)
    blob = bytearray(80 * MiB)
    for i in range(0, len(blob), 4096):  # touched pages: RSS really grows
        blob[i] = 1
    done.set()
    time.sleep(60)


# ----------------------------------------------------------------------------- stats


def test_stats_json_parses(fast_server: shmstore.StoreServer) -> None:
    with fast_server.connect() as store:
        saved = [store.save(Checkpoint(execution_id=f"run-{i % 2}", state={"i": "x" * 100}))
                 for i in range(3)]
    code, out, err = _run(fast_server, "stats", "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["checkpoints"] == len(saved)
    assert stats["executions"] == 2
    assert stats["payload_bytes"] > 300
    assert stats["server_pid"] == fast_server.pid


# ------------------------------------------------------------------ recording to files


def test_monitor_duration_writes_a_valid_png_and_the_csv(
        fast_server: shmstore.StoreServer, tmp_path: Path) -> None:
    with fast_server.connect(name="writer") as store:
        for _ in range(50):
            store.save(Checkpoint(execution_id="run", state={"blob": b"x" * 10_000}))
        payload = store.stats().payload_bytes
        png, table = tmp_path / "x.png", tmp_path / "x.csv"
        code, out, err = _run(fast_server, "monitor", "--duration", "2", "--plot", str(png),
                              "--csv", str(table))
    assert code == 0, err
    assert "Ctrl-C" not in out  # a recording run shows no live view
    assert f"wrote {png}" in err and f"wrote {table}" in err
    assert _png_size(png) == (1200, 500)

    rows = _rows(table)
    server_rows = [r for r in rows if r["process"] == "server"]
    times = [float(r["t"]) for r in server_rows]
    assert len(times) >= 5 and times == sorted(set(times))  # one row per sample, in order
    assert times[-1] - times[0] > 1.0
    assert {int(r["payload_bytes"]) for r in server_rows} == {payload}
    assert {int(r["checkpoints"]) for r in server_rows} == {50}
    assert all(int(r["rss"]) > MiB and int(r["alive"]) == 1 for r in server_rows)
    writer = [r for r in rows if r["process"].endswith("/writer")]
    assert writer and all(r["uss"] == "" for r in writer)
    assert any(r["process"].endswith("/shmstore-monitor") for r in rows)


def test_a_client_that_allocates_shows_growing_rss_then_dead(
        fast_server: shmstore.StoreServer, tmp_path: Path) -> None:
    ready, go, done = SPAWN.Event(), SPAWN.Event(), SPAWN.Event()
    hog = SPAWN.Process(target=_hog,
                        args=(fast_server.url, fast_server.authkey.hex(), ready, go, done))
    store = fast_server.connect(name="watcher")
    recorder = MemoryRecorder(store, keep=True)

    def hog_now() -> ClientSample | None:
        recorder.poll()
        assert recorder.latest is not None
        return next((c for c in recorder.latest.clients if c.name == "hog"), None)

    with store, reaped(hog, timeout=0):
        assert ready.wait(60)
        assert wait_until(lambda: hog_now() is not None, 10)
        before = hog_now()
        assert before is not None and before.alive and before.pid == hog.pid
        go.set()
        assert done.wait(30)
        assert wait_until(lambda: (hog_now() or before).rss - before.rss > 60 * MiB, 10)
        assert recorder.client_peaks[before.pid] - before.rss > 60 * MiB
        hog.kill()
        hog.join(10)
        assert wait_until(lambda: not (hog_now() or before).alive, 10)

        # The command line sees the same: growth, then death, in what the server kept.
        table = tmp_path / "hog.csv"
        code, _out, err = _run(fast_server, "monitor", "--duration", "0.5", "--backlog",
                               "--csv", str(table))
    assert code == 0, err
    rows = [r for r in _rows(table) if r["process"] == f"{before.pid}/hog"]
    alive = [int(r["rss"]) for r in rows if r["alive"] == "1"]
    assert max(alive) - alive[0] > 60 * MiB
    assert rows[-1]["alive"] == "0"


def test_the_monitor_misses_no_sample_between_refreshes() -> None:
    with shmstore.serve(export=False, monitor_interval=0.02, history_size=5000) as server, \
            server.connect() as store:
        recorder = MemoryRecorder(store, keep=True, backlog=True)
        for _ in range(5):
            recorder.poll()
            # The handshake: a dozen samples have arrived since that read.
            last = recorder.samples[-1].t if recorder.samples else 0.0
            assert wait_until(lambda since=last: len(store.memory_history(since=since)) >= 12,
                              60)
        recorder.poll()
        kept = [s["t"] for s in store.memory_history()]
    got = [s.t for s in recorder.samples]
    assert len(got) > 30
    assert got == [t for t in kept if t <= got[-1]]


def test_the_servers_history_is_bounded() -> None:
    with shmstore.serve(export=False, monitor_interval=0.02, history_size=5) as server, \
            server.connect() as store:
        assert wait_until(lambda: len(store.memory_history()) == 5, 10)
        first = store.memory_history()
        assert wait_until(lambda: store.memory_history()[0]["t"] > first[-1]["t"], 10)
        assert len(store.memory_history()) == 5


# ------------------------------------------------------------------------- live view


def test_duration_alone_runs_the_live_view_for_that_long(
        fast_server: shmstore.StoreServer) -> None:
    started = time.monotonic()
    code, out, err = _run(fast_server, "monitor", "--duration", "1")
    assert code == 0, err
    assert time.monotonic() - started >= 1.0
    # Not a terminal: rich prints the last frame when the view ends.
    assert "RSS / heap payload" in out
    # The monitor is one of the store's own tools: hidden, unless --all.
    assert "shmstore-monitor" not in out and "--all shows them" in out
    code, out, err = _run(fast_server, "monitor", "--duration", "1", "--all")
    assert code == 0, err
    assert "shmstore-monitor" in out
    # A live client's state is its growth verdict (one second: too few samples yet).
    assert "warming up" in out or "steady" in out
    assert f"server pid {fast_server.pid}" in out


@pytest.mark.parametrize("mode", ["plain", "rich"])
def test_ctrl_c_ends_the_live_view_with_exit_code_0(
        fast_server: shmstore.StoreServer, tmp_path: Path, mode: str) -> None:
    table = tmp_path / "live.csv"
    args = ["monitor", "--interval", "0.1", "--csv", str(table)]
    if mode == "plain":
        proc = _cli(fast_server, *args, "--plain")
        needle = "server RSS"
    else:  # rich draws live frames only on a terminal; these make it believe it has one
        proc = _cli(fast_server, *args, TTY_COMPATIBLE="1", TTY_INTERACTIVE="1")
        needle = "RSS / heap payload"
    try:
        _read_until(proc, needle)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert [r for r in _rows(table) if r["process"] == "server"]


def test_the_monitor_exits_non_zero_when_the_server_goes_away(tmp_path: Path) -> None:
    server = shmstore.serve(export=False, monitor_interval=0.1)
    table = tmp_path / "gone.csv"
    try:
        proc = _cli(server, "monitor", "--plain", "--interval", "0.1", "--csv", str(table))
        try:
            _read_until(proc, "server RSS")
            server.shutdown()
            _out, err = proc.communicate(timeout=30)
        finally:
            reap(proc)
    finally:
        server.shutdown()
    assert proc.returncode == 1
    assert f"the server at {server.url} went away" in err and "Traceback" not in err
    assert _rows(table)  # what was seen before is still written


def test_no_server_is_a_clear_error_before_any_view(tmp_path: Path) -> None:
    server = shmstore.serve(export=False)
    server.shutdown()
    code, out, err = _run(server, "monitor", "--duration", "1")
    assert code == 2
    assert "StoreUnavailable" in err and out == ""


# ---------------------------------------------------------------------------- options


def test_plot_without_matplotlib_names_the_extra(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    png = tmp_path / "x.png"
    code = main(["monitor", "--duration", "1", "--plot", str(png),
                 "--url", "unix:///nowhere/store.sock"])
    err = capsys.readouterr().err
    assert code == 2
    assert "matplotlib" in err and "shmstore[cli]" in err
    assert not png.exists()


@pytest.mark.parametrize("args", [["--interval", "0"], ["--duration", "-1"],
                                  ["--duration", "nan"], ["--interval", "x"],
                                  ["--window", "1"]])
def test_bad_monitor_options_are_refused(args: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["monitor", *args])
    assert exc.value.code == 2
    assert "monitor" in capsys.readouterr().err


# ------------------------------------------------------------------------------- API


def _sample(t: float, rss: int, payload: int, clients: tuple[ClientSample, ...]) -> MemorySample:
    return MemorySample(t, rss, rss // 2, payload // 100, payload, clients)


def test_csv_rows_are_one_per_process_per_sample(tmp_path: Path) -> None:
    samples = [
        _sample(100.0, 10 * MiB, 0, (ClientSample(7, "a", MiB, True),)),
        _sample(100.5, 12 * MiB, 500, (ClientSample(7, "a", 2 * MiB, True),
                                       ClientSample(9, "b", 3 * MiB, True))),
        _sample(101.0, 12 * MiB, 900, (ClientSample(7, "a", 2 * MiB, False),
                                       ClientSample(9, "b", 3 * MiB, True))),
    ]
    path = tmp_path / "m.csv"
    assert write_csv(samples, str(path)) == 8
    rows = _rows(path)
    assert [(r["t"], r["process"], r["alive"]) for r in rows] == [
        ("100.000", "server", "1"), ("100.000", "7/a", "1"),
        ("100.500", "server", "1"), ("100.500", "7/a", "1"), ("100.500", "9/b", "1"),
        ("101.000", "server", "1"), ("101.000", "7/a", "0"), ("101.000", "9/b", "1"),
    ]
    assert rows[2]["uss"] == str(6 * MiB) and rows[3]["uss"] == ""
    assert [r["payload_bytes"] for r in rows[5:]] == ["900"] * 3
    assert [r["checkpoints"] for r in rows[5:]] == ["9"] * 3

    png = tmp_path / "m.png"
    write_plot(samples, str(png), title="three samples")
    assert _png_size(png) == (1200, 500)


def test_the_recorder_reads_growth_rates_over_its_window() -> None:
    class History:
        """Samples as a server would hand them out: only those after ``since``."""

        def __init__(self) -> None:
            self.samples: list[dict[str, Any]] = []
            self.asked: list[float | None] = []

        def memory_history(self, since: float | None = None) -> list[dict[str, Any]]:
            self.asked.append(since)
            return [s for s in self.samples if since is None or s["t"] > since]

        def add(self, t: float, rss: int, hog: int, alive: bool = True) -> None:
            self.samples.append({"t": t, "server_rss": rss, "server_uss": None,
                                 "checkpoints": int(t), "payload_bytes": 1000 * int(t),
                                 "clients": {"42": ["hog", hog, alive]}})

    history = History()
    for t in range(10):
        history.add(float(t), 100 * MiB, MiB)
    recorder = MemoryRecorder(history, window=3, keep=True)
    assert len(recorder.poll()) == 10
    assert [s.t for s in recorder.samples] == [9.0]  # no backlog: the state at the start
    assert recorder.server_growth() == 0.0
    history.add(10.0, 102 * MiB, 5 * MiB)
    history.add(11.0, 104 * MiB, 9 * MiB)
    assert [s.t for s in recorder.poll()] == [10.0, 11.0]
    # Each poll asks from the newest it has, then once more from the newest it got (an
    # answer is bounded: it reads on until none is left); never for a sample again.
    assert history.asked == [None, 9.0, 9.0, 11.0]
    assert recorder.server_growth() == 2 * MiB  # (104 - 100) MiB over 2 s
    assert recorder.client_growth(42) == 4 * MiB
    assert recorder.payload_growth() == 1000.0
    assert recorder.poll() == [] and recorder.latest is not None and recorder.latest.t == 11.0
    history.add(12.0, 104 * MiB, 0)  # a process on its way out can read 0 bytes
    recorder.poll()
    assert recorder.client_growth(42) == 4 * MiB  # ... which is no shrinking
    history.add(13.0, 104 * MiB, 9 * MiB, alive=False)
    recorder.poll()
    assert recorder.client_growth(42) is None  # a dead client does not grow
    assert recorder.client_peaks[42] == 9 * MiB
    assert recorder.peak_server_rss == 104 * MiB
    assert recorder.latest_uss() is None
    history.samples[-2]["server_uss"] = 50 * MiB  # USS read at 12.0, not at 13.0
    again = MemoryRecorder(history, window=3)
    again.poll()
    assert again.latest is not None and again.latest.server_uss is None
    assert again.latest_uss() == 50 * MiB
    assert [s.t for s in recorder.samples] == [9.0, 10.0, 11.0, 12.0, 13.0]
    with pytest.raises(shmstore.ConfigError):
        MemoryRecorder(history, window=1)


def test_run_monitor_records_an_in_process_store(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    with shmstore.MemoryStore() as store:
        store.save(Checkpoint(execution_id="run", state={"x": b"y" * 5000}))
        code = run_monitor(store, refresh=0.05, duration=0.3, csv_path=str(tmp_path / "m.csv"),
                           plot_path=str(tmp_path / "m.png"), out=out, err=err)
    assert code == 0
    assert out.getvalue() == ""
    rows = _rows(tmp_path / "m.csv")
    assert len(rows) >= 3 and {r["checkpoints"] for r in rows} == {"1"}
    assert _png_size(tmp_path / "m.png") == (1200, 500)


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (0, 1023, 1536, 5 * MiB, -2 * MiB, 3 * 1024**4)] == [
        "0 B", "1023 B", "1.5 KiB", "5.0 MiB", "-2.0 MiB", "3072.0 GiB"]


def test_rss_per_payload_is_only_shown_once_the_payload_means_something() -> None:
    from shmstore.core.stats import RATIO_MIN_PAYLOAD
    from shmstore.monitor.view import _ratio

    small = MemorySample(t=0.0, server_rss=25 * 2**20, server_uss=None, checkpoints=3,
                         payload_bytes=12, clients=())
    big = MemorySample(t=0.0, server_rss=3 * RATIO_MIN_PAYLOAD, server_uss=None,
                       checkpoints=3, payload_bytes=2 * RATIO_MIN_PAYLOAD, clients=())
    assert _ratio(small) == "—"
    assert _ratio(big) == "1.50x"


def test_a_closed_pipe_ends_the_plain_view_quietly() -> None:
    with shmstore.serve(export=False) as server:
        env = {**os.environ, "SHMSTORE_URL": server.url,
               "SHMSTORE_AUTHKEY": server.authkey.hex()}
        proc = subprocess.Popen(
            [sys.executable, "-m", "shmstore", "monitor", "--plain", "--interval", "0.05"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            assert proc.stdout is not None and proc.stderr is not None
            assert proc.stdout.readline()  # it is running; now the reader leaves
            proc.stdout.close()
            assert proc.wait(30) == 0
            assert b"Traceback" not in proc.stderr.read()
        finally:
            reap(proc)


def test_the_plot_marks_a_leaking_client_and_says_how_clients_ended() -> None:
    from shmstore.monitor.export import _Plot

    samples = []
    for i in range(60):  # 30 s at 0.5 s: one client climbs 2 MiB/s, one holds still
        t = 100.0 + i * 0.5
        clients = (ClientSample(7, "leaky", 30 * MiB + MiB * i, True),
                   ClientSample(8, "steady", 30 * MiB, True),
                   ClientSample(9, "killed", 30 * MiB, i < 30, state="" if i < 30 else "gone"),
                   ClientSample(10, "done", 30 * MiB, i < 40,
                                state="alive" if i < 40 else "exited"))
        samples.append(_sample(t, 100 * MiB, 10 * MiB, clients))
    plot = _Plot(samples)
    assert plot.label(7, "7/leaky") == "7/leaky (leaking +120.0 MiB/min)"
    assert plot.label(8, "8/steady") == "8/steady"
    assert plot.label(9, "9/killed") == "9/killed (gone)"
    assert plot.label(10, "10/done") == "10/done (exited)"
