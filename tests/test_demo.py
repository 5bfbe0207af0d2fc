"""`shmstore demo`: the pipeline across processes, a worker killed, the run resumed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shmstore.cli import main as cli  # the module
from shmstore.cli.demo import DemoReport, DemoRow, expected_total, format_text, run_demo
from shmstore.core.stats import StoreStats

from .helpers import children, reap

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^(demo-\d\d)\s+3/3\s+([\d >-]+?)\s+(yes|no)\s+(\d+)\s+(\d+)$", re.M)


def test_demo_command_short(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["demo", "--executions", "6", "--processes", "3", "--delay", "0.2",
                     "--plain"])
    out, _ = capsys.readouterr()
    assert code == 0, out
    rows = ROW.findall(out)
    assert [r[0] for r in rows] == [f"demo-{i:02d}" for i in range(1, 7)]
    assert [int(r[4]) for r in rows] == [expected_total(n) for n in range(6)]
    assert {r[3] for r in rows} == {"2"}  # max_checkpoints=2 kept two of three
    resumed = [r for r in rows if r[2] == "yes"]
    assert [r[0] for r in resumed] == ["demo-04"]  # the execution whose worker was killed
    first, second = resumed[0][1].split(" -> ")
    assert f"killed worker {first} (SIGKILL) in the middle of step 'transform' of demo-04" in out
    assert first != second
    assert "downstream stage (pid" in out and f"total = {sum(int(r[4]) for r in rows)}" in out
    assert "memory: 13 checkpoints" in out  # 6 x 2 kept, and the downstream stage's summary
    assert "all 6 executions completed with the right result" in out


def test_demo_without_the_kill_resumes_nothing() -> None:
    report = run_demo(executions=3, processes=2, delay=0.0, kill=False)
    assert report.ok
    assert report.killed_pid is None
    assert not any(row.resumed for row in report.rows)
    assert report.summary_total == sum(expected_total(n) for n in range(3))


def test_a_wrong_result_fails_the_report() -> None:
    stats = StoreStats(checkpoints=0, executions=0, payload_bytes=0, server_pid=1,
                       server_rss=0, uptime_s=0.0, ops={})
    row = DemoRow("demo-01", 3, (1, 1, 1), 2, 14, correct=True)
    good = DemoReport([row], 1, "unix:///x", None, None, None, 5, 14, stats, 1.0)
    assert good.ok
    assert not DemoReport([row], 1, "unix:///x", None, None, None, 5, 15, stats, 1.0).ok
    wrong = DemoRow("demo-01", 3, (1, 2, 2), 2, 13, correct=False)
    report = DemoReport([wrong], 1, "unix:///x", 9, "demo-01", "transform", 5, 13, stats, 1.0)
    assert not report.ok
    text = format_text(report)
    assert "in the middle of step 'transform' of demo-01" in text
    assert "13 WRONG" in text and "CHECK FAILED" in text and "1 -> 2" in text


def test_demo_command_as_shipped_runs_in_under_30_seconds() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "shmstore", "demo"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        reap(proc)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, out + err
    assert elapsed < 30
    assert "demo-12" in out and "killed worker" in out
    assert "all 12 executions completed with the right result" in out


# A parent that adopts orphans (PR_SET_CHILD_SUBREAPER): any process the demo command
# left behind becomes its child, alive or a zombie, once the command has returned.
ORPHAN_WATCH = """
import ctypes, json, subprocess, sys
import psutil
libc = ctypes.CDLL("libc.so.6", use_errno=True)
if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl failed")
rounds = []
for _ in range(3):
    done = subprocess.run([sys.executable, "-m", "shmstore", "demo", "--executions", "3",
                           "--processes", "2", "--delay", "0.02", "--plain"],
                          capture_output=True, text=True, timeout=60)
    left = psutil.Process().children()
    rounds.append({"code": done.returncode, "left": [c.pid for c in left],
                   "err": done.stderr[-500:]})
    for child in left:
        child.kill()
        child.wait(10)
print(json.dumps(rounds))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="adopting orphans needs Linux's PR_SET_CHILD_SUBREAPER")
@pytest.mark.timeout(180)
def test_demo_command_returns_after_every_process_it_started() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN_WATCH], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=170)
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    rounds = json.loads(out)
    assert [r["code"] for r in rounds] == [0, 0, 0], rounds
    assert [r["left"] for r in rounds] == [[], [], []], rounds


def test_run_demo_returns_after_every_process_it_started() -> None:
    for _ in range(2):
        assert run_demo(executions=3, processes=2, delay=0.0).ok
        assert children() == []
