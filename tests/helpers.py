"""Helpers for multiprocess tests: spawn children and always reap them."""

from __future__ import annotations

import contextlib
import importlib.metadata
import multiprocessing
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil

SPAWN = multiprocessing.get_context("spawn")


def entry_point_installed() -> bool:
    """True when the installed distribution registers our pytest plugin (``pytest11``)."""
    return any(ep.name == "shmstore" and ep.value == "shmstore.pytest_plugin"
               for ep in importlib.metadata.entry_points(group="pytest11"))


#: Arguments that load exactly the plugins an inner pytest run (pytester) needs.  They go
#: with `INNER_RUN_ENV`, which turns off loading every installed plugin by entry point:
#: importing those (hypothesis, anyio, langsmith, ...) took most of each inner run's time.
#: xdist workers inherit both (the environment, and ``-p`` through xdist's option dict).
#: ``-p NAME`` loads the entry point called NAME, so each plugin is registered under the
#: name it has in a real run (ours checks ``hasplugin("xdist")``); from a checkout without
#: our entry point, ``-p`` imports the module.
PLUGIN_ARGS = ["-p", "xdist", "-p", "timeout",
               "-p", "shmstore" if entry_point_installed() else "shmstore.pytest_plugin"]
INNER_RUN_ENV = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def isolate_inner_runs(monkeypatch: Any) -> None:
    """Set `INNER_RUN_ENV` for the inner pytest runs (and their workers) of this test."""
    for key, value in INNER_RUN_ENV.items():
        monkeypatch.setenv(key, value)


@contextlib.contextmanager
def reaped(*procs: Any, timeout: float = 60.0) -> Iterator[list[Any]]:
    """Start the given processes; on exit join them, killing any still alive."""
    started = []
    try:
        for proc in procs:
            proc.start()
            started.append(proc)
        yield started
    finally:
        deadline = time.monotonic() + timeout
        for proc in started:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in started:
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def reap(proc: subprocess.Popen[Any]) -> None:
    """Kill a subprocess if it still runs, wait for it and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def run_all(target: Callable[..., Any], argsets: list[tuple[Any, ...]],
            timeout: float = 60.0) -> list[int | None]:
    """Run ``target(*args)`` in one spawned process per argset; return their exit codes."""
    procs = [SPAWN.Process(target=target, args=args) for args in argsets]
    with reaped(*procs, timeout=timeout):
        pass
    return [p.exitcode for p in procs]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until true or ``timeout``; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# Processes that session fixtures own (a shared server, redis-server); they outlive
# single tests on purpose.
SESSION_PIDS: set[int] = set()


def children() -> list[psutil.Process]:
    """Live (non-zombie) descendants of this process, less those it keeps on purpose.

    Left out: the session fixtures' servers (`SESSION_PIDS`), and the resource tracker
    the spawn context starts once per parent, which lives as long as the parent (the
    stdlib's, not ours).
    """
    out = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        if child.pid in SESSION_PIDS:
            continue
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            if "resource_tracker" in " ".join(child.cmdline()):
                continue
            out.append(child)
    return out
