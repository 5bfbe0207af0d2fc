"""Payload per execution over time: the samples carry the largest executions (and the
rest is the others'), the recorder judges each one's growth, and the views, the plot and
the doctor say which execution makes the store grow."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

import shmstore
from shmstore import Checkpoint
from shmstore.monitor.doctor import diagnose, format_diagnosis
from shmstore.monitor.recorder import ExecutionSample, MemoryRecorder, MemorySample
from shmstore.monitor.view import plain_line, rich_view

from .helpers import wait_until

KIB = 1024
MIB = 1024 * KIB


def _sample(t: float, executions: list[tuple[str, int, int]], rest: int = 0) -> dict[str, Any]:
    payload = sum(e[2] for e in executions) + rest
    return {"t": t, "server_rss": 100 * MIB + payload, "server_uss": None,
            "checkpoints": sum(e[1] for e in executions), "payload_bytes": payload,
            "segment_bytes": 0, "clients": {}, "executions": [list(e) for e in executions]}


class _History:
    """A server's history, written by the test: 30 s at 0.5 s, where ``grows`` gains
    2 MiB a second and ``fixed`` stays at 40 MiB (the largest until ``grows`` passes it)."""

    def __init__(self) -> None:
        self.samples = []
        for i in range(60):
            t = 1000.0 + i / 2
            grows = 1 * MIB + 2 * MIB * (i / 2)
            top = sorted([("fixed", 40, 40 * MIB), ("grows", i + 1, int(grows)),
                          ("small", 3, 3 * KIB)], key=lambda e: -e[2])
            self.samples.append(_sample(t, top[:2], rest=top[2][2] + 5 * MIB))

    def memory_history(self, since: float | None = None) -> list[dict[str, Any]]:
        return [s for s in self.samples if since is None or s["t"] > since]


def test_a_sample_has_the_largest_executions_and_the_rest_is_the_others() -> None:
    with shmstore.serve(export=False, monitor_interval=0.05) as server, \
            server.connect() as store:
        for n, size in (("big", 64 * KIB), ("mid", 16 * KIB), ("tiny", 100)):
            store.save_many(Checkpoint(execution_id=n, state=b"x" * size) for _ in range(3))
        for i in range(6):
            store.save(Checkpoint(execution_id=f"other-{i}", state=b"y" * 10))
        stats = store.stats()
        assert wait_until(lambda: store.memory_history()[-1]["checkpoints"] == 15, timeout=30)
        sample = MemorySample.from_dict(store.memory_history()[-1])
    names = [e.name for e in sample.executions]
    assert names[:3] == ["big", "mid", "tiny"]  # largest first
    assert len(names) == len(stats.largest_executions) == 5  # at most LARGEST
    assert sample.executions[0].checkpoints == 3
    assert sample.executions[0].payload_bytes == dict(
        (n, b) for n, _, b in stats.largest_executions)["big"]
    assert sample.rest_bytes == sample.payload_bytes - sum(
        e.payload_bytes for e in sample.executions) > 0  # the 'other-*' not listed


def test_an_in_process_store_and_redis_samples_have_executions_too(
        store: shmstore.BaseStore) -> None:
    store.save(Checkpoint(execution_id="only", state=b"z" * 1000))
    # (a server samples on its own clock: wait for one taken after the save)
    assert wait_until(lambda: store.memory_history()[-1]["checkpoints"] == 1, timeout=30)
    sample = MemorySample.from_dict(store.memory_history()[-1])
    assert [e.name for e in sample.executions] == ["only"]
    assert sample.executions[0].checkpoints == 1
    assert sample.rest_bytes == 0


def test_an_older_servers_samples_have_no_executions() -> None:
    raw = _sample(1.0, [])
    del raw["executions"]
    assert MemorySample.from_dict(raw).executions == ()


def test_the_recorder_names_the_execution_that_grows_and_not_the_fixed_one() -> None:
    recorder = MemoryRecorder(_History())
    recorder.poll()
    judged = recorder.execution_verdicts()
    assert [e.name for e, _ in judged] == ["grows", "fixed"]  # the worst first
    grows, fixed = (g for _, g in judged)
    assert grows.verdict == "leaking" and grows.per_minute == pytest.approx(120 * MIB, rel=0.01)
    assert fixed.verdict == "steady"
    assert judged[0][0] == ExecutionSample("grows", 60, int(1 * MIB + 2 * MIB * 29.5))


def test_the_views_and_the_doctor_say_which_execution_grows() -> None:
    recorder = MemoryRecorder(_History())
    d = diagnose(recorder)
    text = format_diagnosis(d)
    assert "the payload grows in:\n  grows: " in text
    assert "fixed:" not in text  # steady: not named
    assert d.to_dict()["executions"][0]["execution"] == "grows"
    line = plain_line(recorder)
    assert "largest executions: grows=" in line and "[grows +120.0 MiB/min]" in line
    assert "fixed=40.0 MiB " in line + " "
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=120).print(rich_view(recorder, url="u", server_pid=1, refresh=1))
    shown = out.getvalue()
    assert "the rest" in shown and "grows +120.0 MiB/min" in shown and "leaking" not in shown


def test_the_plot_draws_each_large_execution(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib", reason="the plot needs the [cli] extra")
    from shmstore.monitor import export

    drawn: list[str] = []
    real = export._Plot._executions

    def spy(self: Any, ax: Any) -> None:
        real(self, ax)
        drawn.extend(line.get_label() for line in ax.get_lines())

    recorder = MemoryRecorder(_History(), keep=True, backlog=True)
    recorder.poll()
    monkeypatch.setattr(export._Plot, "_executions", spy)
    export.write_plot(recorder.samples, str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 10_000
    assert drawn[-3:] == ["fixed", "grows (+120.0 MiB/min)", "other executions"] or \
        drawn[-3:] == ["grows (+120.0 MiB/min)", "fixed", "other executions"]
