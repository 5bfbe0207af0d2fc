"""The worker processes of `Pipeline.run_many`: spawn, dispatch, replace the dead, reap.

`dispatch` runs many executions over a few spawned workers, one execution per worker at
a time.  A worker that dies is reaped and replaced, and its execution goes back to the
front of the queue, to resume from its last checkpoint in another worker; an execution
that takes down ``max_attempts`` workers is given up.  The first error a task raises
stops new assignments; executions in flight finish first, and the error is raised with
the worker's traceback as its cause.

No worker outlives this process: each holds the read end of a lifeline pipe whose write
end only this process has (end of file when this process dies, SIGKILL included), and
on Linux the kernel kills it too (``PR_SET_PDEATHSIG``).

What a worker runs is a `Task`, pickled to each worker once; the pool knows nothing of
pipelines or stores.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from multiprocessing import connection
from typing import Any, Protocol

from ..core.errors import ShmstoreError

__all__ = ["WORKER_STOP_TIMEOUT", "Task", "dispatch"]

log = logging.getLogger("shmstore")

#: Seconds a finished worker gets to exit before it is killed.
WORKER_STOP_TIMEOUT = 5.0
#: Linux's ``prctl`` option that signals a process when its parent dies.
_PR_SET_PDEATHSIG = 1

_SPAWN = multiprocessing.get_context("spawn")

#: A worker's message: ("done", execution id, final checkpoint id) or
#: ("error", execution id, the exception, its traceback text).
Message = tuple[Any, ...]


class Task(Protocol):
    """What a worker runs for each execution; picklable (it crosses to spawned workers)."""

    def __call__(self, execution_id: str, state: Any) -> str:
        """Run the execution from ``state`` (or resume it); return its final checkpoint id."""
        ...

    def close(self) -> None:
        """Release what the task holds (its store connection) as the worker exits."""
        ...


def dispatch(task: Task, jobs: Mapping[str, Any], *, name: str, processes: int,
             max_attempts: int, advance: Callable[[], None]) -> dict[str, str]:
    """Run every job in worker processes; return ``{execution id: final checkpoint id}``.

    Parameters:
        task: what each worker runs, ``task(execution_id, state)``.
        jobs: ``{execution_id: initial state}``.
        name: the pipeline's name, in the workers' process names and in errors.
        processes: how many workers run at once (never more than there are jobs).
        max_attempts: how many workers one execution may take down before giving up.
        advance: called once per finished execution (a progress bar).

    Raises:
        ShmstoreError: an execution took down ``max_attempts`` workers, or a worker died
            before it started.
        Exception: the first error a task raised, caused by the worker's traceback.
    """
    return _Pool(task, jobs, name=name, wanted=min(processes, len(jobs)),
                 max_attempts=max_attempts, advance=advance).run()


class _RemoteTraceback(Exception):
    """The traceback of an error raised in a worker process (the cause of the re-raise)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


@dataclasses.dataclass
class _Pool:
    """One `dispatch`: the queue, the workers, and what has finished or failed."""

    task: Task
    jobs: Mapping[str, Any]
    name: str
    wanted: int
    max_attempts: int
    advance: Callable[[], None]
    pending: collections.deque[str] = dataclasses.field(init=False)
    losses: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    finished: dict[str, str] = dataclasses.field(default_factory=dict)  # eid -> checkpoint id
    failure: tuple[BaseException, str] | None = None
    workers: list[_Worker] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.pending = collections.deque(self.jobs)

    def run(self) -> dict[str, str]:
        """Assign, wait, collect and replace until no worker has an execution."""
        clean = False
        try:
            self.workers.extend(_Worker(self.task, self.name) for _ in range(self.wanted))
            while self._assign():
                connection.wait([w.conn for w in self.workers]
                                + [w.process.sentinel for w in self.workers])
                for worker in list(self.workers):
                    self._collect(worker)
                    if not worker.alive:
                        self._bury(worker)
            clean = True
        finally:
            _stop_workers(self.workers, clean=clean)
        if self.failure is not None:
            error, remote = self.failure
            raise error from _RemoteTraceback(remote)
        return self.finished

    @property
    def _open(self) -> bool:
        """Whether executions may still be handed out: some wait, and nothing failed."""
        return bool(self.pending) and self.failure is None

    def _assign(self) -> bool:
        """Give each idle worker the next execution; False once no worker has one."""
        for worker in self.workers:
            if worker.task is None and self._open:
                eid = self.pending.popleft()
                worker.assign(eid, self.jobs[eid])
        return any(w.task is not None for w in self.workers)

    def _collect(self, worker: _Worker) -> None:
        """Take the worker's results: a finished execution, or the first failure."""
        for kind, eid, *rest in worker.messages():
            worker.task = None
            if kind == "done":
                self.finished[eid] = rest[0]
                self.advance()
            elif self.failure is None:
                self.failure = (rest[0], rest[1])

    def _bury(self, worker: _Worker) -> None:
        """Reap a dead worker, queue its execution again, and start its replacement."""
        self.workers.remove(worker)
        code = worker.reap()
        if not worker.started:
            raise ShmstoreError(
                f"a worker of pipeline {self.name!r} died before it started "
                f"(exit code {code}); its error is on stderr.  Are the steps "
                "importable top-level functions?", exitcode=code,
            )
        if worker.task is not None and self.failure is None:
            self._requeue(worker.task, worker.pid, code)
        if self._open and len(self.workers) < self.wanted:
            self.workers.append(_Worker(self.task, self.name))

    def _requeue(self, lost: str, pid: int | None, code: int | None) -> None:
        """Put a dead worker's execution first in the queue, unless it killed too many."""
        self.losses[lost] += 1
        if self.losses[lost] >= self.max_attempts:
            raise ShmstoreError(
                f"execution {lost!r} took down {self.losses[lost]} workers "
                f"(the last exit code {code}); giving up on it",
                execution_id=lost, exitcode=code,
            )
        log.warning("worker %d died (exit code %s) running execution %s; "
                    "it resumes from its last checkpoint", pid, code, lost)
        self.pending.appendleft(lost)


class _Worker:
    """One spawned worker process, its pipe, and the execution it is running.

    Besides the task pipe, the worker gets the read end of a lifeline pipe whose write end
    only this process holds: when this process dies (SIGKILL included) the worker reads
    end of file and exits, so no orphan keeps running steps.
    """

    def __init__(self, task: Task, name: str) -> None:
        self.conn, child_conn = _SPAWN.Pipe()
        lifeline_read, self.lifeline = _SPAWN.Pipe(duplex=False)
        self.process = _SPAWN.Process(
            target=_worker_main, args=(child_conn, task, lifeline_read, os.getpid()),
            name=f"shmstore-{name}-worker")
        try:
            self.process.start()
        except BaseException:
            self.conn.close()
            self.lifeline.close()
            raise
        finally:
            child_conn.close()
            lifeline_read.close()
        self.pid = self.process.pid
        self.task: str | None = None
        self.started = False
        self.broken = False

    def assign(self, execution_id: str, state: Any) -> None:
        self.conn.send((execution_id, state))
        self.task = execution_id

    def messages(self) -> Iterator[Message]:
        """The messages that have arrived; marks the worker broken at end of file."""
        while not self.broken:
            try:
                if not self.conn.poll():
                    return
                message = self.conn.recv()
            except (EOFError, OSError):
                self.broken = True
                return
            if message[0] == "ready":
                self.started = True
                continue
            yield message

    @property
    def alive(self) -> bool:
        return not self.broken and self.process.is_alive()

    def reap(self) -> int | None:
        """Wait for the process to end (killing it if need be), close its pipes.

        Returns its exit code.  After the kill the join has no timeout: SIGKILL cannot be
        ignored, and returning while the process still runs is what left one behind.
        """
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        code = self.process.exitcode
        self.process.close()
        self.conn.close()
        self.lifeline.close()
        return code


def _stop_workers(workers: list[_Worker], *, clean: bool) -> None:
    """Ask idle workers to exit (or kill them all if we are failing); reap every one."""
    for worker in workers:
        if clean and worker.alive:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        else:
            worker.process.kill()
    deadline = time.monotonic() + WORKER_STOP_TIMEOUT
    for worker in workers:
        worker.process.join(max(0.0, deadline - time.monotonic()))
        worker.reap()


# -- in the worker ---------------------------------------------------------------------


def _die_with_parent(lifeline: connection.Connection, parent_pid: int) -> None:
    """Make this worker exit as soon as the process that started it is gone.

    On Linux the kernel sends SIGKILL when the parent dies (``PR_SET_PDEATHSIG``); the
    lifeline thread covers every platform: its read ends with end of file when the
    parent's write end closes, however the parent died.  Either way nothing is printed.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            # CDLL(None): this process's own symbols, libc's prctl among them (no search).
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                lifeline.recv_bytes()
        os._exit(1)

    threading.Thread(target=watch, name="shmstore-worker-lifeline", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the watch began
        os._exit(1)


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a `ShmstoreError` that describes it."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return ShmstoreError(f"{type(exc).__name__}: {exc}", type_name=type(exc).__name__)
    return exc


def _run_one(task: Task, execution_id: str, state: Any) -> Message:
    """Run one execution; the message that tells the parent how it ended."""
    try:
        final = task(execution_id, state)
    except Exception as exc:
        return ("error", execution_id, _portable(exc), traceback.format_exc())
    return ("done", execution_id, final)


def _worker_main(conn: connection.Connection, task: Task,
                 lifeline: connection.Connection, parent_pid: int) -> None:
    """A worker: run the executions the parent sends until it sends None or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent(lifeline, parent_pid)
    try:
        try:
            conn.send(("ready", os.getpid()))
        except OSError:
            return  # the parent is gone already
        while True:
            try:
                job = conn.recv()
            except (EOFError, OSError):
                return
            if job is None:
                return
            try:
                conn.send(_run_one(task, *job))
            except OSError:
                return  # the parent is gone (BrokenPipeError): nobody to tell
    finally:
        with contextlib.suppress(Exception):
            task.close()
        conn.close()
