"""`shmstore demo`: a checkpointed three-stage pipeline across processes, one worker killed.

`run_demo` starts a server, runs a dozen executions of ``fetch -> transform -> report`` on
four worker processes with `Pipeline.run_many`, kills one worker (SIGKILL) in the middle
of a step, and lets its execution resume from its last checkpoint in another worker.  A
downstream stage in a process of its own waits (`Pipeline.wait`) for every execution's
final checkpoint and adds up the results.  It returns a `DemoReport`; `format_text` and
`rich_renderables` turn that into what the command prints.

The step functions live at the top level of this module because spawned workers import
them by name.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing import resource_tracker
from typing import Any

import psutil

from ..core.checkpoint import Checkpoint
from ..core.errors import StoreTimeout
from ..core.stats import StoreStats
from ..core.store import BaseStore
from ..integrations.pipeline import CheckpointConfig, Pipeline
from ..server.process import serve

__all__ = ["DemoReport", "DemoRow", "format_text", "rich_renderables", "run_demo"]

DEMO_EXECUTIONS = 12
DEMO_PROCESSES = 4
#: Seconds each step takes, so that there is a middle of a step to be killed in.
DEMO_DELAY = 0.25
DEMO_MAX_CHECKPOINTS = 2
SUMMARY_EXECUTION = "demo-summary"
#: How long the downstream stage waits for one execution before it gives up.
SUMMARY_TIMEOUT = 60.0
VALUES_PER_EXECUTION = 4

_SPAWN = multiprocessing.get_context("spawn")

log = logging.getLogger("shmstore")


def _resource_tracker_running() -> bool:
    return getattr(resource_tracker._resource_tracker, "_fd", None) is not None


def _stop_resource_tracker() -> None:
    """Stop multiprocessing's resource tracker and wait for it to exit.

    The spawn context starts it with the first process and leaves it to notice its
    parent's exit, so it outlived the ``shmstore demo`` command by a moment.  The demo
    registers no resources with it; it starts again if anything needs it.
    """
    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is None:
        return  # a Python without it: the tracker ends shortly after this process
    try:
        stop()
    except Exception as exc:  # a private stdlib helper: never fail the demo over it
        log.debug("could not stop multiprocessing's resource tracker: %s", exc)


def _worked(state: dict[str, Any], **changes: Any) -> dict[str, Any]:
    time.sleep(state["delay"])
    return {**state, **changes, "workers": [*state["workers"], os.getpid()]}


def fetch(state: dict[str, Any]) -> dict[str, Any]:
    """Stage 1: produce the execution's numbers."""
    seed = state["seed"]
    return _worked(state, values=list(range(seed, seed + VALUES_PER_EXECUTION)))


def transform(state: dict[str, Any]) -> dict[str, Any]:
    """Stage 2: square them."""
    return _worked(state, values=[v * v for v in state["values"]])


def report(state: dict[str, Any]) -> dict[str, Any]:
    """Stage 3: add them up."""
    return _worked(state, total=sum(state["values"]))


def expected_total(seed: int) -> int:
    """What `report` must come to for an execution started with ``seed``."""
    return sum(v * v for v in range(seed, seed + VALUES_PER_EXECUTION))


def demo_pipeline(store: BaseStore) -> Pipeline:
    """The demo's pipeline over ``store``, keeping the newest two checkpoints per execution."""
    return Pipeline([fetch, transform, report], name="demo",
                    config=CheckpointConfig(store=store, max_checkpoints=DEMO_MAX_CHECKPOINTS))


def summarize(pipeline: Pipeline, execution_ids: list[str]) -> None:
    """The downstream stage: wait for every execution to finish, save the grand total."""
    try:
        total = 0
        for eid in execution_ids:
            total += pipeline.wait(eid, timeout=SUMMARY_TIMEOUT).state["total"]
        pipeline.store.save(Checkpoint(
            execution_id=SUMMARY_EXECUTION, node_name="summarize",
            state={"total": total, "executions": len(execution_ids), "pid": os.getpid()},
        ))
    finally:
        pipeline.store.close()


@dataclasses.dataclass(frozen=True)
class DemoRow:
    """One execution of the demo, as the table shows it."""

    execution_id: str
    steps: int
    workers: tuple[int, ...]
    checkpoints_kept: int
    total: int
    correct: bool

    @property
    def resumed(self) -> bool:
        """True when more than one worker process ran its steps."""
        return len(set(self.workers)) > 1


@dataclasses.dataclass(frozen=True)
class DemoReport:
    """What a demo run did; ``ok`` says whether every check held."""

    rows: list[DemoRow]
    processes: int
    server_url: str
    killed_pid: int | None
    killed_execution: str | None
    killed_during: str | None
    summary_pid: int | None
    summary_total: int | None
    stats: StoreStats
    elapsed_s: float

    @property
    def ok(self) -> bool:
        """Every execution finished with the right result, and the summary adds up."""
        return bool(self.rows) and all(r.correct for r in self.rows) \
            and self.summary_total == sum(r.total for r in self.rows)


class _Killer(threading.Thread):
    """Kill the worker running ``execution_id`` as soon as it has checkpointed its first step.

    The next step is then in progress: the worker dies in the middle of it.
    """

    def __init__(self, pipeline: Pipeline, execution_id: str) -> None:
        super().__init__(name="shmstore-demo-killer", daemon=True)
        self.pipeline, self.execution_id = pipeline, execution_id
        self.stop = threading.Event()
        self.killed: int | None = None
        self.during: str | None = None

    def run(self) -> None:
        first_step = self.pipeline.steps[0][0]
        while not self.stop.is_set():
            try:
                cp = self.pipeline.wait(self.execution_id, step=first_step, timeout=0.2)
            except StoreTimeout:
                continue
            pid = cp.state["workers"][-1]
            # Only ever a worker of ours: a child of this process.
            if pid in {child.pid for child in psutil.Process().children()}:
                os.kill(pid, signal.SIGKILL)
                self.killed = pid
                # The step the dead worker was in (None: it had finished the execution).
                self.during = self.pipeline.get_state(self.execution_id).next
            return


def run_demo(
    *,
    executions: int = DEMO_EXECUTIONS,
    processes: int = DEMO_PROCESSES,
    delay: float = DEMO_DELAY,
    kill: bool = True,
    progress: bool = False,
) -> DemoReport:
    """Run the demo on a server of its own and report what happened.

    It returns after every process it started has exited.

    Parameters:
        executions: how many executions to run.
        processes: how many worker processes.
        delay: seconds each step takes.
        kill: kill one worker in the middle of a step.
        progress: show a progress bar on stderr (needs ``rich``).

    Example:
        >>> report = run_demo(executions=6, processes=3, delay=0.05)
        >>> report.ok
        True
    """
    tracker_was_running = _resource_tracker_running()
    try:
        return _run_demo(executions=executions, processes=processes, delay=delay, kill=kill,
                         progress=progress)
    finally:
        # Return only once every process the demo started is gone: the tracker too,
        # when the demo started it (someone else's tracker may be tracking their own).
        if not tracker_was_running:
            _stop_resource_tracker()


def _run_demo(*, executions: int, processes: int, delay: float, kill: bool, progress: bool
              ) -> DemoReport:
    started = time.monotonic()
    ids = [f"demo-{i:02d}" for i in range(1, executions + 1)]
    with serve(export=False) as server, server.connect() as store:
        pipeline = demo_pipeline(store)
        downstream = _SPAWN.Process(target=summarize, args=(pipeline, ids),
                                           name="shmstore-demo-summary")
        downstream.start()
        killer = _Killer(pipeline, ids[len(ids) // 2]) if kill else None
        try:
            if killer is not None:
                killer.start()
            results = pipeline.run_many(
                {eid: {"seed": n, "delay": delay, "workers": []} for n, eid in enumerate(ids)},
                processes=processes, progress=progress,
            )
            downstream.join(SUMMARY_TIMEOUT)
        finally:
            if killer is not None:
                killer.stop.set()
                killer.join()
            if downstream.is_alive():
                downstream.kill()
                downstream.join()
        summary = store.latest(SUMMARY_EXECUTION)
        rows = []
        for n, eid in enumerate(ids):
            state = results[eid]
            rows.append(DemoRow(
                execution_id=eid, steps=len(state["workers"]), workers=tuple(state["workers"]),
                checkpoints_kept=len(pipeline.history(eid)), total=state["total"],
                correct=state["total"] == expected_total(n),
            ))
        return DemoReport(
            rows=rows, processes=processes, server_url=server.url,
            killed_pid=None if killer is None else killer.killed,
            killed_execution=None if killer is None or killer.killed is None
            else killer.execution_id,
            killed_during=None if killer is None else killer.during,
            summary_pid=None if summary is None else summary.state["pid"],
            summary_total=None if summary is None else summary.state["total"],
            stats=store.stats(), elapsed_s=time.monotonic() - started,
        )


def _workers_text(row: DemoRow) -> str:
    distinct = list(dict.fromkeys(row.workers))
    return " -> ".join(str(pid) for pid in distinct)


def _table_rows(report: DemoReport) -> list[tuple[str, ...]]:
    return [(row.execution_id, f"{row.steps}/3", _workers_text(row),
             "yes" if row.resumed else "no", str(row.checkpoints_kept),
             f"{row.total}" + ("" if row.correct else " WRONG")) for row in report.rows]


HEADERS = ("execution", "steps", "worker pids", "resumed?", "checkpoints kept", "result")


def _notes(report: DemoReport) -> list[str]:
    lines = []
    if report.killed_pid is not None:
        where = "after it had finished" if report.killed_during is None \
            else f"in the middle of step '{report.killed_during}' of"
        lines.append(f"killed worker {report.killed_pid} (SIGKILL) {where} "
                     f"{report.killed_execution}; another worker resumed it from its last "
                     "checkpoint")
    if report.summary_total is not None:
        lines.append(f"downstream stage (pid {report.summary_pid}) waited for "
                     f"{len(report.rows)} final checkpoints made by other processes: "
                     f"total = {report.summary_total}")
    else:
        lines.append("downstream stage: no summary")
    lines.append(f"memory: {report.stats.summary()}")
    verdict = f"all {len(report.rows)} executions completed with the right result" \
        if report.ok else "CHECK FAILED"
    lines.append(f"{verdict}; {report.elapsed_s:.1f} s")
    return lines


def format_text(report: DemoReport) -> str:
    """The report as plain text: a table, then what happened."""
    rows = [HEADERS, *_table_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, "", *_notes(report)])


def rich_renderables(report: DemoReport) -> list[Any]:
    """The report as rich renderables (a table, then notes); needs ``rich``."""
    from rich.table import Table

    table = Table(title=f"shmstore demo: {len(report.rows)} executions on "
                        f"{report.processes} processes")
    for header in HEADERS:
        table.add_column(header, justify="right" if header in {"steps", "result",
                                                               "checkpoints kept"} else "left")
    for cells in _table_rows(report):
        style = "bold yellow" if cells[3] == "yes" else None
        table.add_row(*cells, style=style)
    return [table, *_notes(report)]
