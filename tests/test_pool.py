"""`pool.dispatch` on its own: any picklable task, no pipeline, no store."""

from __future__ import annotations

import os
from typing import Any

import pytest

from shmstore.integrations import pool

from .helpers import children


class Echo:
    """A task that names the worker that ran it, and refuses states it is told to."""

    def __call__(self, execution_id: str, state: Any) -> str:
        if state == "refuse":
            raise ValueError(f"{execution_id} refused")
        return f"{execution_id}:{state}:{os.getpid()}"

    def close(self) -> None:
        pass


def test_dispatch_runs_every_job_in_workers_and_reports_each() -> None:
    jobs = {f"e{i}": i for i in range(5)}
    advanced: list[None] = []
    done = pool.dispatch(Echo(), jobs, name="echo", processes=2, max_attempts=3,
                         advance=lambda: advanced.append(None))
    assert sorted(done) == sorted(jobs)
    assert all(done[eid].startswith(f"{eid}:{state}:") for eid, state in jobs.items())
    pids = {int(value.rsplit(":", 1)[1]) for value in done.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2  # never more workers than asked
    assert len(advanced) == 5
    assert children() == []  # every worker reaped


def test_dispatch_raises_the_first_task_error_with_the_worker_traceback() -> None:
    with pytest.raises(ValueError, match="bad refused") as err:
        pool.dispatch(Echo(), {"bad": "refuse"}, name="echo", processes=1, max_attempts=3,
                      advance=lambda: None)
    assert "in __call__" in str(err.value.__cause__)
    assert children() == []
