"""Memory per test, in every process of a pytest run: ``--shmstore-memory`` and the
``shmstore_limit_growth`` marker (the pytest plugin, `pytest_plugin`, registers them).

With ``--shmstore-memory`` each process that runs tests (every xdist worker, or the one
process without xdist) reads its RSS and USS before and after every test (setup, call
and teardown) and saves them to the run's store, one checkpoint per test in the
execution ``pytest-memory/<run>/<worker>``; at the end the controller (or the single
process) reads them back and reports the tests after which a worker grew most, and
each worker's growth over the run; then it clears them.  The workers register with the
server as ``pytest-<worker>`` (role ``pytest``), so ``shmstore monitor`` and
``shmstore doctor`` show and judge them while the run goes on.

``@pytest.mark.shmstore_limit_growth("10 MiB")`` (needs no option) fails a test whose
process grew by more than that during its call: RSS after the test function minus RSS
before it, so fixtures set up for it do not count.

Every reading follows a garbage collection and (glibc) ``malloc_trim(0)``, which hands
the allocator's free pages back: RSS is then what the process keeps (a global list, a
cache), not what it freed and the allocator held for reuse; memory allocated and given
back within the test does not show.  (Python's own small-object arenas are not
trimmed: a test that leaves many small objects behind shows as what they occupy.)  It answers "which
test makes my workers grow", not "which line allocated" (memray's flame graphs do).

Example:
    >>> pytest -n 4 --shmstore-memory        # the report comes after the test summary
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
import uuid
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ..core.store import BaseStore

__all__ = ["MARKER", "PREFIX", "MemoryTracker", "TestMemory", "growth_limit", "report_lines",
           "run_id"]

#: The marker that bounds a test's growth.
MARKER = "shmstore_limit_growth"
#: Executions of the per-test figures: ``PREFIX<run>/<worker>``.
PREFIX = "pytest-memory/"
#: The role the measuring processes register with (``shmstore monitor`` shows it).
ROLE = "pytest"
#: The report lists this many tests.
TOP = 10
NODE = "pytest.test"
_CALL_GROWTH = pytest.StashKey[int]()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def run_id() -> str:
    """A new run's id (the executions of two runs on one server never mix)."""
    return uuid.uuid4().hex[:12]


def _rss() -> int:
    """This process's resident bytes: one read of ``/proc/self/statm`` (psutil elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def _uss() -> int | None:
    """This process's unique set size (None where the platform has none)."""
    import psutil

    try:
        return getattr(psutil.Process().memory_full_info(), "uss", None)
    except (psutil.Error, NotImplementedError):
        return None


def growth_limit(item: pytest.Item) -> int | None:
    """The bytes the item's ``shmstore_limit_growth`` marker allows (None: no marker).

    Raises:
        ConfigError: the marker's argument is not a size (``"10 MiB"``, ``2_000_000``).
    """
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return None
    from ..core.errors import ConfigError
    from ..core.stats import parse_bytes

    if len(marker.args) != 1 or marker.kwargs:
        raise ConfigError(f"@pytest.mark.{MARKER} takes one size, e.g. "
                          f'@pytest.mark.{MARKER}("10 MiB"), not {marker.args!r}',
                          value=repr(marker.args))
    return parse_bytes(str(marker.args[0]))


@dataclasses.dataclass(frozen=True)
class TestMemory:
    """One test's figures in one process: RSS (and USS) before setup and after teardown,
    and the RSS growth of its call alone."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    test: str
    worker: str
    rss_before: int
    rss_after: int
    uss_before: int | None
    uss_after: int | None
    call_growth: int
    t: float

    @property
    def growth(self) -> int:
        """RSS gained from before its setup to after its teardown (negative: it shrank)."""
        return self.rss_after - self.rss_before

    @property
    def uss_growth(self) -> int | None:
        if self.uss_before is None or self.uss_after is None:
            return None
        return self.uss_after - self.uss_before

    def to_state(self) -> dict[str, Any]:
        return {"test": self.test, "rss": [self.rss_before, self.rss_after],
                "uss": [self.uss_before, self.uss_after], "call": self.call_growth,
                "t": self.t}

    @classmethod
    def from_state(cls, worker: str, state: dict[str, Any]) -> TestMemory:
        return cls(str(state["test"]), worker, int(state["rss"][0]), int(state["rss"][1]),
                   state["uss"][0], state["uss"][1], int(state["call"]), float(state["t"]))


class MemoryTracker:
    """Measures every test of this process and saves its figures to the run's store.

    Parameters:
        store: opens the store to save to (called once, at the session's start, so that
            its connection is not the first test's growth); None: measure for the
            marker only, save nothing.
        execution: the execution this process's figures go to.
        worker: this process's name in the report (``gw0``, or ``main``).
    """

    def __init__(self, store: Callable[[], BaseStore] | None, *, execution: str,
                 worker: str) -> None:
        self._open = store
        self._store: BaseStore | None = None
        self.execution = execution
        self.worker = worker
        self.measured = 0
        self._trim: Callable[[], object] | None = None
        self._trim_ready = False

    def _settle(self) -> None:
        """Collect garbage and hand the C allocator's free pages back (glibc), so that
        RSS is what the process keeps, not what it freed and the allocator holds: without
        it, the first test to free an 8 MiB state stays 8 MiB larger (glibc then serves
        such states from its heap), and the next test to keep one looks free."""
        if not self._trim_ready:
            from ..monitor.sampler import malloc_trimmer

            self._trim, self._trim_ready = malloc_trimmer(), True
        gc.collect()
        if self._trim is not None:
            self._trim()

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if self._open is not None and self._store is None:
            self._store = self._open()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item,
                                nextitem: pytest.Item | None) -> Generator[None, Any, None]:
        if self._store is None:
            yield
            return
        self._settle()
        uss, rss = _uss(), _rss()
        yield
        self._settle()
        after_rss, after_uss = _rss(), _uss()
        figures = TestMemory(item.nodeid, self.worker, rss, after_rss, uss, after_uss,
                             item.stash.get(_CALL_GROWTH, 0), time.time())
        from ..core.checkpoint import Checkpoint

        self._store.save(Checkpoint(execution_id=self.execution, node_name=NODE,
                                    state=figures.to_state()))
        self.measured += 1

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        growth_limit(item)  # a bad marker is this test's error, at its setup

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, Any, None]:
        limited = item.get_closest_marker(MARKER) is not None
        if not limited and self._store is None:
            yield  # neither measured nor limited: nothing to read (every test of every
            return  # project where shmstore is installed comes through here)
        if limited:  # (settling costs a full collection: only where a limit is judged)
            self._settle()
        before = _rss()
        yield
        if limited:
            self._settle()  # garbage, and memory freed to the allocator, is not growth
        item.stash[_CALL_GROWTH] = _rss() - before

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item,
                                  call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        if call.when != "call" or not report.passed:
            return
        limit = growth_limit(item)
        growth = item.stash.get(_CALL_GROWTH, 0)
        if limit is not None and growth > limit:
            from ..core.stats import format_bytes

            report.outcome = "failed"
            report.longrepr = (
                f"{item.nodeid}: this process grew by {format_bytes(growth)} during the "
                f"test, more than the {format_bytes(limit)} its @pytest.mark.{MARKER} "
                f"allows (RSS after the call and a garbage collection, minus before it)")

    def close(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            store.close()


def collect(store: BaseStore, run: str) -> list[TestMemory]:
    """Every test's figures of run ``run`` from every worker, oldest first."""
    scope = f"{PREFIX}{run}/"
    found: list[TestMemory] = []
    for execution in store.executions():
        if execution.startswith(scope):
            worker = execution[len(scope):]
            found.extend(TestMemory.from_state(worker, cp.state)
                         for cp in store.list(execution))
    return sorted(found, key=lambda m: m.t)


def discard(store: BaseStore, run: str) -> int:
    """Clear run ``run``'s figures from the store; return the checkpoints dropped."""
    scope = f"{PREFIX}{run}/"
    return sum(store.clear(e) for e in store.executions() if e.startswith(scope))


def report_lines(figures: Iterable[TestMemory], *, top: int = TOP) -> list[str]:
    """The report: each worker's growth over the run, and the tests after which a
    worker grew most (RSS from before setup to after teardown), the most first."""
    from ..core.stats import format_bytes

    every = list(figures)
    if not every:
        return ["no test was measured"]
    by_worker: dict[str, list[TestMemory]] = {}
    for m in every:
        by_worker.setdefault(m.worker, []).append(m)

    def signed(n: float) -> str:
        return ("+" if n >= 0 else "-") + format_bytes(abs(n))

    lines = [f"{len(every)} tests measured in {len(by_worker)} process"
             f"{'es' if len(by_worker) != 1 else ''}:"]
    for worker in sorted(by_worker):
        ms = by_worker[worker]
        lines.append(f"  {worker}: {len(ms)} tests, RSS {format_bytes(ms[0].rss_before)} -> "
                     f"{format_bytes(ms[-1].rss_after)} "
                     f"({signed(ms[-1].rss_after - ms[0].rss_before)})")
    growers = sorted((m for m in every if m.growth > 0), key=lambda m: -m.growth)[:top]
    if not growers:
        lines.append("no test was followed by growth")
        return lines
    lines.append("tests after which a process grew most (RSS; USS; during the call alone):")
    for m in growers:
        uss = "" if m.uss_growth is None else f"; USS {signed(m.uss_growth)}"
        lines.append(f"  {signed(m.growth):>12}  {m.worker:<5} {m.test}  "
                     f"(RSS {format_bytes(m.rss_after)} after{uss}; call "
                     f"{signed(m.call_growth)})")
    return lines
