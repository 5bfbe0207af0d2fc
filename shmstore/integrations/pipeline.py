"""Checkpointed multi-stage pipelines, in one process or in many that share one store.

A `Pipeline` runs named steps (functions ``state -> state``) in order and saves a
checkpoint after each one, so that a run that crashed resumes after its last completed
step.  `Pipeline.run_many` spreads many executions over spawned worker processes that
share one store; a worker that dies is replaced and its execution resumes from its last
checkpoint in another worker.  `Pipeline.wait` lets a stage in one process block until
another process has checkpointed a step.

This is LangGraphGo's ``CheckpointableRunnable`` (configured by ``CheckpointConfig``),
point by point:

| | LangGraphGo `CheckpointableRunnable` | `shmstore.Pipeline` |
|---|---|---|
| save after each node (`AutoSave`) | a listener saves after each step and drops a failed save (`_ = saveErr`; earlier versions saved in a fire-and-forget goroutine) | saved synchronously after every step, before the next starts; a failed save raises from `run` |
| `AutoSave = false` | nothing is saved automatically | with `save_interval`: at most one checkpoint per interval plus the final one; without: the final one only |
| `SaveInterval` | declared, never read | honoured with `auto_save=False`; `auto_save=True` with an interval is a `ConfigError`, not silently ignored |
| `MaxCheckpoints` | declared, never enforced | the newest N checkpoints per execution are kept; older ones are deleted after each save |
| default store | `NewMemoryCheckpointStore()` | a `MemoryStore` of the pipeline's own; any store, e.g. a `SharedStore` to cross processes |
| versions | `latest.Version + 1` read from `List` then written: two writers get the same version | assigned by the store; every save is a compare-and-set on the version the run started from (`VersionConflict` if another runner wrote meanwhile) |
| "latest" | the last element of `List`, whose order is random | the store's highest version |
| execution id | one per runnable (`exec_<nanos>`), shared by every `Invoke` | one per run: `run(execution_id=...)`, default a new time-ordered id |
| resume (`ResumeFromCheckpoint`) | returns the saved state and runs nothing | `run(execution_id=...)` runs the steps after the last checkpointed one, with its state; a finished execution returns its final state and runs nothing |
| time travel | `GetState` can read a `checkpoint_id`; nothing can run from it | `run(..., checkpoint_id=...)` runs the steps after that checkpoint; `parent_id` records the fork |
| `GetState` | values, metadata, time; `Next` never filled | `get_state()` returns a `StateSnapshot` whose `next` names the next step (`None` when done) |
| `UpdateState(values, asNode)` | merges maps over the random "latest"; racy version | merges dicts (otherwise replaces) over the latest or a chosen checkpoint, saved as if `as_node` made it, so `run` continues after `as_node`; compare-and-set |
| errors | step errors returned; save errors swallowed | step errors propagate unchanged (nothing is saved for that step); store errors propagate |
| several processes | none | `run_many(states, processes=N)` over one shared store, dead workers replaced, their executions resumed; `wait(execution_id, step=...)` across processes |

Checkpoints carry the step's name as ``node_name`` and the metadata ``{"pipeline": name,
"step": index, "done": bool, "pid": pid}`` (plus ``"source": "update"`` from
`Pipeline.update_state`); the checkpoint with ``done`` true marks a finished execution.

Step functions given to `Pipeline.run_many` must be importable top-level functions:
spawned workers import them by module and name (a lambda or a nested function is a
`ConfigError`).  A step that was running when its worker died runs again; a step whose
checkpoint was saved never does.

Example:
    >>> from shmstore import Pipeline
    >>> def double(state): return state * 2
    >>> def inc(state): return state + 1
    >>> pipe = Pipeline([double, inc])
    >>> pipe.run(5, execution_id="run-1")
    11
    >>> [cp.node_name for cp in pipe.history("run-1")]
    ['double', 'inc']
"""  # noqa: E501 - the comparison table reads best one row per line

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from ..backends.memory import MemoryStore
from ..core.checkpoint import Checkpoint, new_id, validate_id
from ..core.errors import ConfigError, ShmstoreError, StoreTimeout, VersionConflict
from ..core.store import BaseStore
from ..core.validate import duration, optional_duration
from ..server.process import serve
from . import pool

__all__ = ["CheckpointConfig", "Pipeline", "StateSnapshot"]

log = logging.getLogger("shmstore")

#: Worker processes `Pipeline.run_many` starts unless told otherwise.
DEFAULT_PROCESSES = 4
#: How many workers one execution may lose before `Pipeline.run_many` gives up on it.
MAX_ATTEMPTS = 3
#: How often a worker re-resumes an execution whose save met a `VersionConflict`.
CONFLICT_RETRIES = 3

#: The clock of ``save_interval``; tests replace it.
_now = time.monotonic

Step = Callable[[Any], Any]
StepSpec = Step | tuple[str, Step]


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """How a `Pipeline` checkpoints: the seed's ``CheckpointConfig``, every field honoured.

    Parameters:
        store: where checkpoints go; None gives each pipeline a `MemoryStore` of its own.
        auto_save: save after every step, synchronously (errors propagate).
        save_interval: with ``auto_save=False``, save at most once per this many seconds,
            plus the final checkpoint.  Without it, only the final checkpoint is saved.
        max_checkpoints: keep only the newest N checkpoints of each execution.

    Raises:
        ConfigError: a bad value, or ``save_interval`` together with ``auto_save=True``.

    Example:
        >>> CheckpointConfig(auto_save=False, save_interval=5.0, max_checkpoints=3)
    """

    store: BaseStore | None = None
    auto_save: bool = True
    save_interval: float | None = None
    max_checkpoints: int | None = None

    def __post_init__(self) -> None:
        if self.store is not None and not isinstance(self.store, BaseStore):
            raise ConfigError(f"store must be a shmstore store or None, not "
                              f"{type(self.store).__name__}", value=repr(self.store)[:80])
        if type(self.auto_save) is not bool:
            raise ConfigError(f"auto_save must be a bool, not {self.auto_save!r}",
                              value=repr(self.auto_save))
        interval = self.save_interval
        if interval is not None:
            interval = duration(interval, "save_interval")
            if self.auto_save:
                raise ConfigError("save_interval applies only with auto_save=False "
                                  "(auto_save=True saves after every step)",
                                  value=repr(interval))
            object.__setattr__(self, "save_interval", float(interval))
        keep = self.max_checkpoints
        if keep is not None and (type(keep) is not int or keep < 1):
            raise ConfigError(f"max_checkpoints must be an int >= 1 or None, not {keep!r}",
                              value=repr(keep))


@dataclasses.dataclass(frozen=True)
class StateSnapshot:
    """Where an execution stands (the seed's ``StateSnapshot``, with ``next`` filled in).

    Attributes:
        execution_id: the execution.
        values: its state (None before the first checkpoint).
        next: the name of the step that runs next; None when the execution is done.
        checkpoint: the checkpoint it was read from (None before the first).
    """

    execution_id: str
    values: Any
    next: str | None
    checkpoint: Checkpoint | None

    @property
    def done(self) -> bool:
        """True when every step has run."""
        return self.next is None


def _enforce_max_checkpoints(store: BaseStore, execution_id: str, keep: int | None) -> int:
    """Drop all but the newest ``keep`` checkpoints of the execution; return how many.

    The store's own retention rule does it, in one atomic request: ``purge`` with ``keep``
    (core/rules.py ``purge_plan``, and its Lua twin on Redis), so no reader sees the
    execution half trimmed and a pipeline spends one round trip, not one per checkpoint.
    It is not the store's ``Limits(max_per_execution=)``, which keeps the same newest N
    but is a property of the whole data set, fixed by whoever made the store (a server's
    ``serve(limits=)``, Redis' shared limits) for every execution in it: a pipeline given
    a shared store can neither set it nor give its executions a retention of their own
    beside other pipelines' or a LangGraph saver's.  Both apply; the tighter wins.
    """
    if keep is None:
        return 0
    return store.purge(execution_id, keep=keep)


def _merge(current: Any, values: Any) -> Any:
    """``values`` over ``current``: dicts merge key by key, anything else is replaced."""
    if isinstance(current, Mapping) and isinstance(values, Mapping):
        return {**current, **values}
    return values


def _normalize_steps(steps: Iterable[StepSpec]) -> tuple[tuple[str, Step], ...]:
    if isinstance(steps, (str, bytes, Mapping)):
        raise ConfigError("steps must be a list of functions or (name, function) pairs",
                          value=repr(steps)[:80])
    out: list[tuple[str, Step]] = []
    seen: set[str] = set()
    for item in steps:
        name, fn = _named_step(item)
        if name in seen:
            raise ConfigError(f"two steps are named {name!r}; step names must be unique "
                              "(give (name, function) pairs)", value=name)
        seen.add(name)
        out.append((name, fn))
    if not out:
        raise ConfigError("a pipeline needs at least one step", value="")
    return tuple(out)


def _named_step(item: object) -> tuple[str, Step]:
    """One step as ``(name, function)``: a pair as given, or a function by its name."""
    name: object
    fn: Any
    if isinstance(item, tuple):
        if len(item) != 2:
            raise ConfigError(f"a step pair must be (name, function), not {item!r:.80}",
                              value=repr(item)[:80])
        name, fn = item
    else:
        name, fn = getattr(item, "__name__", None), item
    if type(name) is not str or not name:
        raise ConfigError(f"step {fn!r:.60} has no usable name; give it as a "
                          "(name, function) pair", value=repr(item)[:80])
    if not callable(fn):
        raise ConfigError(f"step {name!r} is not callable: {fn!r:.80}", value=name)
    return name, fn


class Pipeline:
    """Named steps run in order, with a checkpoint after each: resumable, shareable.

    Parameters:
        steps: functions ``state -> state`` (named by ``__name__``) or ``(name, function)``
            pairs; names are unique.  For `run_many` they must be importable top-level
            functions.
        config: how to checkpoint (default: `CheckpointConfig()`).
        name: the pipeline's name, stored in every checkpoint's metadata; an execution
            made by another pipeline is refused.

    Raises:
        ConfigError: no steps, a duplicate or missing name, a step that is not callable.

    Example:
        >>> pipe = Pipeline([("fetch", fetch), ("parse", parse)],
        ...                 config=CheckpointConfig(store=shmstore.connect()))
        >>> pipe.run({"url": "..."}, execution_id="job-7")   # resumes if job-7 crashed
    """

    def __init__(
        self,
        steps: Iterable[StepSpec],
        *,
        config: CheckpointConfig | None = None,
        name: str = "pipeline",
    ) -> None:
        self.name = validate_id(name, "pipeline name")
        self.steps = _normalize_steps(steps)
        if config is not None and not isinstance(config, CheckpointConfig):
            raise ConfigError(f"config must be a CheckpointConfig, not {type(config).__name__}",
                              value=repr(config)[:80])
        self.config = config if config is not None else CheckpointConfig()
        self.store: BaseStore = self.config.store if self.config.store is not None \
            else MemoryStore()
        self._index = {step: i for i, (step, _) in enumerate(self.steps)}

    def __repr__(self) -> str:
        names = " -> ".join(step for step, _ in self.steps)
        return f"<Pipeline {self.name!r}: {names} on {self.store!r}>"

    def __reduce__(self) -> tuple[Any, ...]:
        if isinstance(self.store, MemoryStore):
            raise ConfigError(
                f"pipeline {self.name!r} keeps its checkpoints in a MemoryStore, which lives "
                "in one process; give it a SharedStore (CheckpointConfig(store="
                "shmstore.serve().connect())) to use it in another process",
                value=self.name,
            )
        return (_rebuild_pipeline, (self.steps, self.config, self.name))

    # -- one execution ------------------------------------------------------------------

    def run(
        self,
        state: Any = None,
        *,
        execution_id: str | None = None,
        checkpoint_id: str | None = None,
    ) -> Any:
        """Run the steps in order, checkpointing as configured; return the final state.

        An execution that has checkpoints resumes after its latest one, with that
        checkpoint's state (``state`` is then not used); a finished one returns its final
        state without running anything.

        Parameters:
            state: the input of the first step, for an execution without checkpoints.
            execution_id: the execution; default a new id.
            checkpoint_id: time travel: run the steps after this checkpoint of the
                execution, with its state, even if later ones exist.  The new checkpoints
                follow the execution's latest version; their ``parent_id`` links the fork.

        Raises:
            Exception: whatever a step raised; the checkpoints before it are kept.
            VersionConflict: another runner saved a checkpoint of this execution meanwhile.
            EncodeError: a step returned a state the store cannot encode.
            CheckpointNotFound: ``checkpoint_id`` does not exist.
            ConfigError: the execution or checkpoint belongs to another pipeline or
                execution, or names a step this pipeline does not have.
            StoreUnavailable: the store is gone.

        Example:
            >>> pipe.run({"n": 1}, execution_id="job-1")
            >>> pipe.run(execution_id="job-1")        # done already: the same result
        """
        return self._run(state, execution_id, checkpoint_id).state

    def _run(self, state: Any, execution_id: str | None, checkpoint_id: str | None
             ) -> Checkpoint:
        """Run and return the final checkpoint (which always exists afterwards)."""
        eid = new_id() if execution_id is None else validate_id(execution_id, "execution_id")
        store, steps, config = self.store, self.steps, self.config
        latest = store.latest(eid)
        base = latest if checkpoint_id is None else self._checkpoint_of(eid, checkpoint_id)
        start, parent_id = 0, None
        if base is not None:
            start, state, parent_id = self._step_of(base) + 1, base.state, base.id
            if start == len(steps):
                log.debug("execution %s is done (checkpoint %s); nothing to run", eid, base.id)
                return base
            log.info("execution %s resumes after step %r (checkpoint %s, version %d)",
                     eid, base.node_name, base.id, base.version)
        expected = 0 if latest is None else latest.version
        interval = config.save_interval
        last_save = _now()
        saved = None
        for index in range(start, len(steps)):
            name, fn = steps[index]
            try:
                state = fn(state)
            except Exception:
                log.info("step %r of execution %s raised; it will resume after %s",
                         name, eid, parent_id or "nothing (from the start)")
                raise
            final = index == len(steps) - 1
            if final or config.auto_save or (interval is not None
                                             and _now() - last_save >= interval):
                saved = self._save(Checkpoint(
                    execution_id=eid, node_name=name, state=state,
                    metadata=self._metadata(index), parent_id=parent_id,
                ), expected)
                expected, parent_id, last_save = saved.version, saved.id, _now()
        assert saved is not None  # the final step always saves
        return saved

    def _run_resuming_on_conflict(self, execution_id: str, state: Any) -> Checkpoint:
        """`_run`, resumed again if a save conflicts (a dead worker's last save landed late)."""
        for attempt in range(1, CONFLICT_RETRIES + 1):
            try:
                return self._run(state, execution_id, None)
            except VersionConflict as exc:
                if attempt == CONFLICT_RETRIES:
                    raise
                log.info("execution %s: %s; resuming from the latest checkpoint", execution_id,
                         exc)
        raise AssertionError("unreachable")

    def _save(self, checkpoint: Checkpoint, expected_version: int) -> Checkpoint:
        saved = self.store.save(checkpoint, expected_version=expected_version)
        log.debug("execution %s: checkpoint %s after step %r (version %d)",
                  saved.execution_id, saved.id, saved.node_name, saved.version)
        _enforce_max_checkpoints(self.store, saved.execution_id, self.config.max_checkpoints)
        return saved

    def _metadata(self, index: int, **extra: Any) -> dict[str, Any]:
        return {"pipeline": self.name, "step": index, "done": index == len(self.steps) - 1,
                "pid": os.getpid(), **extra}

    def _step_index(self, name: object) -> int:
        index = self._index.get(name) if isinstance(name, str) else None
        if index is None:
            raise ConfigError(f"{name!r} is not a step of pipeline {self.name!r} "
                              f"(its steps: {', '.join(self._index)})", value=repr(name)[:80])
        return index

    def _step_of(self, cp: Checkpoint) -> int:
        """The index of the step after which ``cp`` was saved."""
        owner = cp.metadata.get("pipeline")
        if owner != self.name:
            raise ConfigError(
                f"checkpoint {cp.id} of execution {cp.execution_id!r} was saved by pipeline "
                f"{owner!r}, not {self.name!r}", value=cp.id,
            )
        index = self._index.get(cp.node_name)
        if index is None:
            raise ConfigError(
                f"checkpoint {cp.id} of execution {cp.execution_id!r} follows step "
                f"{cp.node_name!r}, which pipeline {self.name!r} does not have", value=cp.id,
            )
        return index

    def _checkpoint_of(self, execution_id: str, checkpoint_id: str) -> Checkpoint:
        cp = self.store.load(checkpoint_id)
        if cp.execution_id != execution_id:
            raise ConfigError(f"checkpoint {checkpoint_id} belongs to execution "
                              f"{cp.execution_id!r}, not {execution_id!r}", value=checkpoint_id)
        return cp

    # -- inspection and time travel -----------------------------------------------------

    def history(self, execution_id: str, *, newest_first: bool = False) -> list[Checkpoint]:
        """The execution's checkpoints in version order (oldest first unless told).

        Example:
            >>> [cp.node_name for cp in pipe.history("job-1")]
            ['fetch', 'parse']
        """
        return self.store.list(execution_id, newest_first=newest_first)

    def get_state(self, execution_id: str, *, checkpoint_id: str | None = None
                  ) -> StateSnapshot:
        """Where the execution stands: at its latest checkpoint, or at a chosen one.

        Parameters:
            execution_id: the execution.
            checkpoint_id: read this checkpoint of the execution instead of the latest.

        Raises:
            CheckpointNotFound: ``checkpoint_id`` does not exist.
            ConfigError: it belongs to another execution or pipeline.

        Example:
            >>> snap = pipe.get_state("job-1")
            >>> snap.next, snap.values                 # ('parse', {...}) mid-way
        """
        eid = validate_id(execution_id, "execution_id")
        cp = self.store.latest(eid) if checkpoint_id is None \
            else self._checkpoint_of(eid, checkpoint_id)
        if cp is None:
            return StateSnapshot(eid, None, self.steps[0][0], None)
        index = self._step_of(cp) + 1
        following = self.steps[index][0] if index < len(self.steps) else None
        return StateSnapshot(eid, cp.state, following, cp)

    def update_state(
        self,
        execution_id: str,
        values: Any,
        *,
        as_node: str,
        checkpoint_id: str | None = None,
    ) -> Checkpoint:
        """Save a new state as if step ``as_node`` had produced it; `run` continues after it.

        ``values`` is merged into the current state when both are dicts, and replaces it
        otherwise.  The base is the latest checkpoint, or ``checkpoint_id`` (time travel:
        the new checkpoint forks from it and becomes the execution's latest).

        Parameters:
            execution_id: the execution.
            values: the new values.
            as_node: the step that counts as having produced them.
            checkpoint_id: the checkpoint to start from instead of the latest.

        Raises:
            ConfigError: ``as_node`` is not a step, or the base belongs elsewhere.
            CheckpointNotFound: ``checkpoint_id`` does not exist.
            VersionConflict: another runner saved a checkpoint meanwhile.

        Example:
            >>> first = pipe.history("job-1")[0]
            >>> pipe.update_state("job-1", {"limit": 5}, as_node="fetch",
            ...                   checkpoint_id=first.id)
            >>> pipe.run(execution_id="job-1")        # re-runs parse on the new state
        """
        eid = validate_id(execution_id, "execution_id")
        index = self._step_index(as_node)
        latest = self.store.latest(eid)
        base = latest if checkpoint_id is None else self._checkpoint_of(eid, checkpoint_id)
        if base is not None:
            self._step_of(base)  # refuse another pipeline's execution
        cp = Checkpoint(
            execution_id=eid, node_name=as_node,
            state=_merge(None if base is None else base.state, values),
            metadata=self._metadata(index, source="update"),
            parent_id=None if base is None else base.id,
        )
        return self._save(cp, 0 if latest is None else latest.version)

    def wait(self, execution_id: str, *, step: str | None = None,
             timeout: float | None = None) -> Checkpoint:
        """Block until the execution has checkpointed ``step`` (or a later one), or is done.

        For stages in different processes: a downstream process waits for the upstream
        process's checkpoint.  The store wakes the waiter; nothing polls.

        Parameters:
            execution_id: the execution to watch.
            step: the step to wait for; None waits for the final checkpoint.
            timeout: seconds to wait at most; None waits as long as it takes.

        Raises:
            StoreTimeout: ``timeout`` ran out first.
            ConfigError: ``step`` is not a step of this pipeline.

        Example:
            >>> cp = pipe.wait("job-1", step="fetch", timeout=60)   # in another process
            >>> cp.state
        """
        eid = validate_id(execution_id, "execution_id")
        target = len(self.steps) - 1 if step is None else self._step_index(step)
        timeout = optional_duration(timeout, "timeout")
        deadline = None if timeout is None else time.monotonic() + timeout
        cp = self.store.latest(eid)
        while cp is None or self._step_of(cp) < target:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                cp = self.store.wait(eid, after_version=0 if cp is None else cp.version,
                                     timeout=remaining)
            except StoreTimeout:
                what = "finish" if step is None else f"checkpoint step {step!r}"
                raise StoreTimeout(f"execution {eid!r} did not {what} within {timeout} s",
                                   timeout=timeout) from None
        return cp

    # -- many executions, many processes ------------------------------------------------

    def run_many(
        self,
        states: Mapping[str, Any] | Iterable[Any],
        *,
        processes: int = DEFAULT_PROCESSES,
        progress: bool = False,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> dict[str, Any]:
        """Run many executions across worker processes that share one store.

        Each worker (spawned) runs one execution at a time, resuming it if it has
        checkpoints.  If a worker dies, its execution goes back to the queue and another
        worker (a new one takes the dead one's place) resumes it from its last checkpoint:
        steps already checkpointed are not run again, and every execution finishes once.
        With a `MemoryStore` (the default), a server is started for the call; the
        executions' checkpoints are copied to it first and back afterwards.

        Parameters:
            states: ``{execution_id: initial state}``, or initial states (new ids).
            processes: how many workers run at once.
            progress: show a progress bar of finished executions on stderr (needs
                ``rich``, the ``[cli]`` extra; without it there is no bar).
            max_attempts: how many workers one execution may take down before giving up.

        Returns:
            ``{execution_id: final state}``, in the order of ``states``.

        Raises:
            ConfigError: a step is not an importable top-level function (a lambda, a
                nested function), the store cannot cross processes, or a bad option.
            ShmstoreError: an execution took down ``max_attempts`` workers, or a worker
                died before it started.
            Exception: the first error a step raised in a worker (with the worker's
                traceback as its cause); executions in flight finish first, the others
                are left to a later call.

        Example:
            >>> pipe.run_many({f"job-{i}": {"n": i} for i in range(12)}, processes=4)
        """
        jobs = dict(states) if isinstance(states, Mapping) else {new_id(): s for s in states}
        for eid in jobs:
            validate_id(eid, "execution_id")
        for option, value in (("processes", processes), ("max_attempts", max_attempts)):
            if type(value) is not int or value < 1:
                raise ConfigError(f"{option} must be an int >= 1, not {value!r}",
                                  value=repr(value))
        self._check_importable()
        if not jobs:
            return {}
        if not isinstance(self.store, MemoryStore):
            return self._dispatch(self.store, jobs, processes, progress, max_attempts)
        # A MemoryStore lives in this process only: serve its executions for the call.
        with serve(export=False) as server, server.connect() as shared:
            _copy_executions(self.store, shared, jobs)
            finished = False
            try:
                results = self._dispatch(shared, jobs, processes, progress, max_attempts)
                finished = True
            finally:
                try:
                    _copy_executions(shared, self.store, jobs)
                except ShmstoreError as exc:
                    if finished:
                        raise
                    log.warning("could not copy the checkpoints back from the server: %s", exc)
        return results

    def _check_importable(self) -> None:
        for name, fn in self.steps:
            qualname = getattr(fn, "__qualname__", "")
            problem = None
            if "<lambda>" in qualname or "<locals>" in qualname:
                problem = f"{qualname} is a lambda or a function defined inside a function"
            elif getattr(fn, "__module__", None) == "__main__" and not _main_is_a_file():
                problem = (f"{qualname or name} is defined in an interactive __main__ (python -c, "
                           "stdin, a REPL or a notebook), which a spawned worker cannot "
                           "import.  Move the step functions into a .py module and import "
                           "them from there")
            else:
                try:
                    pickle.dumps(fn)
                except Exception as exc:
                    problem = f"it cannot be pickled ({exc})"
            if problem is not None:
                raise ConfigError(
                    f"step {name!r} cannot run in a worker process: {problem}.  Workers are "
                    "spawned and import each step by module and name: define step "
                    "functions at the top level of a module", value=name,
                )

    def _dispatch(self, store: BaseStore, jobs: dict[str, Any], processes: int,
                  progress: bool, max_attempts: int) -> dict[str, Any]:
        """Run ``jobs`` in worker processes over ``store``; return their final states."""
        task = _Resume(Pipeline(self.steps, config=dataclasses.replace(
            self.config, store=store), name=self.name))
        try:
            pickle.dumps(task)
        except ShmstoreError:
            raise
        except Exception as exc:
            raise ConfigError(f"the store {store!r} cannot cross to a worker process ({exc})",
                              value=repr(store)[:80]) from None
        with _progress_bar(len(jobs), enabled=progress, description=self.name) as advance:
            finished = pool.dispatch(task, jobs, name=self.name, processes=processes,
                                     max_attempts=max_attempts, advance=advance)
        final = store.load_many([finished[eid] for eid in jobs])
        return {eid: cp.state for eid, cp in zip(jobs, final, strict=True)}


def _main_is_a_file() -> bool:
    """True when ``__main__`` is a script or module on disk that spawn can run again."""
    main = sys.modules.get("__main__")
    if main is None:
        return False
    if getattr(main, "__spec__", None) is not None:
        return True  # python -m: spawn imports the module by name
    path = getattr(main, "__file__", None)
    return isinstance(path, str) and os.path.isfile(path)


def _rebuild_pipeline(steps: tuple[tuple[str, Step], ...], config: CheckpointConfig,
                      name: str) -> Pipeline:
    return Pipeline(steps, config=config, name=name)


def _copy_executions(source: BaseStore, target: BaseStore, execution_ids: Iterable[str]) -> None:
    """Make ``target`` hold exactly ``source``'s checkpoints of these executions.

    Ids, states, metadata and parents are kept; ``target`` assigns versions anew.
    """
    for eid in execution_ids:
        checkpoints = source.list(eid)
        target.clear(eid)
        if checkpoints:
            target.save_many(checkpoints)


@dataclasses.dataclass(frozen=True)
class _Resume:
    """A worker's task (`pool.Task`): run or resume one execution of the pipeline.

    A save that meets a `VersionConflict` (a dead worker's last save landed late) resumes
    again from the latest checkpoint.
    """

    pipeline: Pipeline

    def __call__(self, execution_id: str, state: Any) -> str:
        return self.pipeline._run_resuming_on_conflict(execution_id, state).id

    def close(self) -> None:
        self.pipeline.store.close()


@contextlib.contextmanager
def _progress_bar(total: int, *, enabled: bool, description: str
                  ) -> Iterator[Callable[[], None]]:
    """Yield a function that advances a rich progress bar on stderr (a no-op without one)."""
    bar_types = _rich_progress() if enabled else None
    if bar_types is None:
        yield lambda: None
        return
    progress_cls, columns, console = bar_types
    with progress_cls(*columns, console=console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def _rich_progress() -> tuple[Any, list[Any], Any] | None:
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )
    except ImportError:
        log.debug("rich is not installed (pip install 'shmstore[cli]'): no progress bar")
        return None
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("executions"), TimeElapsedColumn()]
    return Progress, columns, Console(stderr=True)
