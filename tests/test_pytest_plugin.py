"""The pytest plugin, tested with real runs of throwaway projects (pytester, subprocesses).

Every inner run gets a unique tag in its environment, which the processes it starts —
xdist workers and shmstore servers alike — inherit.  After each run no process may carry
the tag: that is how "no server is left behind" is checked, whoever the server's parent
was, and without mistaking another run's server for ours.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

import shmstore

from .helpers import PLUGIN_ARGS, entry_point_installed, isolate_inner_runs, reap, wait_until

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
TAG = "SHMSTORE_PLUGIN_TEST_RUN"
RUN_TIMEOUT = 90.0
XDIST_RUNS = [pytest.param([], id="no-xdist"), pytest.param(["-n", "2"], id="n2"),
              pytest.param(["-n", "4"], id="n4")]



def tagged(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``tag`` (servers, workers, runs)."""
    out = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(TAG) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


class Project:
    """A throwaway project and the means to run pytest on it."""

    def __init__(self, pytester: pytest.Pytester, tag: str) -> None:
        self.pytester = pytester
        self.tag = tag
        self.out = pytester.path / "out"
        self.out.mkdir()

    def write(self, source: str) -> None:
        # The inner tests find the output directory in their source, not in a fixture.
        self.pytester.makepyfile(source.replace("OUT", repr(str(self.out))))

    def run(self, *args: str, plugins: list[str] = PLUGIN_ARGS) -> pytest.RunResult:
        result = self.pytester.runpytest_subprocess(
            *plugins, "-p", "no:cacheprovider", *args, timeout=RUN_TIMEOUT)
        self.assert_nothing_left()
        return result

    def assert_nothing_left(self) -> None:
        assert wait_until(lambda: not tagged(self.tag), 10.0), (
            f"processes left behind: {[p.cmdline() for p in tagged(self.tag)]}")

    def lines(self, name: str) -> list[str]:
        path = self.out / name
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Project:
    tag = uuid.uuid4().hex
    monkeypatch.setenv(TAG, tag)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    for key in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(key, raising=False)
    isolate_inner_runs(monkeypatch)
    return Project(pytester, tag)


def untagged_server(monkeypatch: pytest.MonkeyPatch, **options: Any) -> shmstore.StoreServer:
    """A server of the outer test (not of the inner run: it does not carry the tag)."""
    with monkeypatch.context() as m:
        m.delenv(TAG)
        return shmstore.serve(export=False, **options)


def assert_gone(pids: set[int]) -> None:
    def all_gone() -> bool:
        return not any(psutil.pid_exists(pid) and psutil.Process(pid).status()
                       != psutil.STATUS_ZOMBIE for pid in pids)
    assert wait_until(all_gone, 10.0), f"server processes still running: {pids}"


# -- sharing -------------------------------------------------------------------------------

SHARING = """
import os
from shmstore import Checkpoint

def test_meet(checkpoint_store, checkpoint_server):
    me = os.environ.get("PYTEST_XDIST_WORKER", "main")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    with open(os.path.join(OUT, "servers"), "a") as fh:
        fh.write(f"{checkpoint_server.pid}\\n")
    assert checkpoint_server.started_by_run
    checkpoint_store.save(Checkpoint(execution_id="meet", node_name=me, state=os.getpid()))
    # Every worker waits until it sees every other worker's checkpoint.
    seen_version = checkpoint_store.latest("meet").version
    while seen_version < workers:
        seen_version = checkpoint_store.wait("meet", after_version=seen_version,
                                             timeout=30).version
    seen = {c.node_name: c.state for c in checkpoint_store.list("meet")}
    assert len(seen) == workers and seen[me] == os.getpid()

def test_stats(checkpoint_server):
    stats = checkpoint_server.stats()
    assert stats.server_pid == checkpoint_server.pid and stats.checkpoints >= 1
"""


@pytest.mark.parametrize("xdist", XDIST_RUNS)
def test_workers_see_each_others_checkpoints_in_one_server(
    project: Project, xdist: list[str],
) -> None:
    project.write(SHARING)
    args = [*xdist, "--dist", "each"] if xdist else []
    result = project.run(*args)
    workers = int(xdist[1]) if xdist else 1
    result.assert_outcomes(passed=2 * workers)
    servers = {int(pid) for pid in project.lines("servers")}
    assert len(project.lines("servers")) == workers
    assert len(servers) == 1  # one server for the whole run
    assert_gone(servers)


ENTRY_POINT = """
from shmstore import Checkpoint

def test_loaded_by_its_entry_point(request, checkpoint_store):
    plugins = request.config.pluginmanager
    assert plugins.get_plugin("shmstore") is not None  # the entry point's name ...
    assert plugins.get_plugin("shmstore.pytest_plugin") is None  # ... not a -p
    assert checkpoint_store.save(Checkpoint(execution_id="ep", state=1)).version == 1
"""


@pytest.mark.skipif(not entry_point_installed(),
                    reason="shmstore is not installed: no pytest11 entry point to load")
def test_an_installed_plugin_loads_by_its_entry_point(
    project: Project, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What a user gets: every installed plugin autoloaded, ours among them, no -p.
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD")
    project.write(ENTRY_POINT)
    result = project.run(plugins=[])
    result.assert_outcomes(passed=1)


# -- computing once ------------------------------------------------------------------------

COMPUTE_ONCE = """
import os, time

STORE = None

def expensive():
    with open(os.path.join(OUT, "computed"), "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    # The handshake: hold the lease until every worker has claimed (the server counts
    # each claim), so that the others really wait for this computation.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    deadline = time.monotonic() + 30
    while STORE.stats().ops.get("claim", 0) < workers and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"rows": list(range(100)), "by": os.getpid()}

def check(store):
    global STORE
    STORE = store
    cp = store.load_or_compute("session", "expensive", expensive, timeout=60)
    with open(os.path.join(OUT, "got"), "a") as fh:
        fh.write(f"{cp.id} {cp.version} {cp.state['by']}\\n")
    assert cp.state["rows"] == list(range(100))

def test_first_use(checkpoint_store):
    check(checkpoint_store)

def test_second_use(checkpoint_store):
    check(checkpoint_store)
"""


@pytest.mark.parametrize("xdist", XDIST_RUNS)
def test_load_or_compute_computes_once_for_the_whole_run(
    project: Project, xdist: list[str],
) -> None:
    project.write(COMPUTE_ONCE)
    args = [*xdist, "--dist", "each"] if xdist else []
    result = project.run(*args)
    workers = int(xdist[1]) if xdist else 1
    result.assert_outcomes(passed=2 * workers)
    computed = project.lines("computed")
    got = project.lines("got")
    assert len(computed) == 1, computed
    assert len(got) == 2 * workers
    assert set(got) == {got[0]}  # every call, every worker: the same checkpoint
    assert got[0].endswith(f" 1 {computed[0]}")


HANDOVER = """
import os, time
from shmstore import Checkpoint

STORE = None

def compute():
    path = os.path.join(OUT, "computed")
    with open(path, "a") as fh:
        fh.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
    with open(path) as fh:
        first = len(fh.read().splitlines()) == 1
    if first:
        # The handshake: fail only once the other worker has claimed too (the server
        # counts each claim): it is waiting on us now.
        deadline = time.monotonic() + 30
        while STORE.stats().ops.get("claim", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        raise RuntimeError("the first computation fails")
    return "second try"

def test_handover(checkpoint_store):
    global STORE
    STORE = checkpoint_store
    # Both workers arrive before either claims, so one really waits for the other.
    checkpoint_store.save(Checkpoint(execution_id="meet", state=0))
    checkpoint_store.wait("meet", after_version=1, timeout=30)
    cp = checkpoint_store.load_or_compute("session", "flaky", compute, timeout=30)
    assert cp.state == "second try"
"""


def test_a_failing_computation_hands_over_to_another_worker(project: Project) -> None:
    project.write(HANDOVER)
    result = project.run("-n", "2", "--dist", "each")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*RuntimeError: the first computation fails*"])
    computed = project.lines("computed")
    assert len(computed) == 2 and computed[0] != computed[1]  # two workers, in turn


CRASH = """
import os, time
from shmstore import Checkpoint

def compute():
    path = os.path.join(OUT, "computed")
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    with open(path) as fh:
        if len(fh.read().splitlines()) == 1:
            os._exit(1)  # the worker dies holding the lease
    return "survivor"

def test_crash(checkpoint_store, checkpoint_server):
    with open(os.path.join(OUT, "servers"), "a") as fh:
        fh.write(f"{checkpoint_server.pid}\\n")
    checkpoint_store.save(Checkpoint(execution_id="meet", state=0))
    checkpoint_store.wait("meet", after_version=1, timeout=30)
    cp = checkpoint_store.load_or_compute("session", "fragile", compute, timeout=30,
                                          lease=1.0)
    assert cp.state == "survivor"
"""


def test_a_crashed_worker_hands_over_after_its_lease_and_the_server_still_stops(
    project: Project,
) -> None:
    project.write(CRASH)
    result = project.run("-n", "2", "--dist", "each")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 1 and outcomes.get("failed") == 1, outcomes
    result.stdout.fnmatch_lines(["*crashed*"])
    assert len(project.lines("computed")) == 2
    servers = {int(pid) for pid in project.lines("servers")}
    assert len(servers) == 1
    assert_gone(servers)


# -- interrupted runs ----------------------------------------------------------------------

INTERRUPTED = """
import os, time

def test_waits_for_ctrl_c(checkpoint_store, checkpoint_server):
    checkpoint_store.load_or_compute("session", "x", lambda: 1)
    with open(os.path.join(OUT, "servers"), "a") as fh:
        fh.write(f"{checkpoint_server.pid}\\n")
    time.sleep(60)
"""


@pytest.mark.parametrize("xdist", XDIST_RUNS[:2])
def test_ctrl_c_stops_the_server(project: Project, xdist: list[str]) -> None:
    project.write(INTERRUPTED)
    cmd = [sys.executable, "-m", "pytest", *PLUGIN_ARGS, "-p", "no:cacheprovider", *xdist]
    # Its own process group, signalled as a whole: what Ctrl-C in a terminal does.
    proc = subprocess.Popen(cmd, cwd=project.pytester.path, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: bool(project.lines("servers")), 60.0)
        server_pid = int(project.lines("servers")[0])
        assert psutil.pid_exists(server_pid)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        reap(proc)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out.decode()
    assert b"KeyboardInterrupt" in out
    assert_gone({server_pid})
    project.assert_nothing_left()


# -- no cost when unused -------------------------------------------------------------------

UNUSED = """
import os, sys
import psutil

def test_no_server_and_no_heavy_imports():
    tag = os.environ["SHMSTORE_PLUGIN_TEST_RUN"]
    servers = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SHMSTORE_PLUGIN_TEST_RUN") == tag and \\
                    "_child_main" in " ".join(proc.cmdline()):
                servers.append(proc.pid)
        except psutil.Error:
            pass
    assert servers == []
    assert "shmstore.pytest_plugin" in sys.modules  # the plugin is loaded ...
    heavy = {"shmstore.server", "shmstore.client", "shmstore.store", "msgpack"}
    assert heavy.isdisjoint(sys.modules)          # ... and cost nothing

def test_other():
    assert True
"""


@pytest.mark.parametrize("xdist", XDIST_RUNS[:2])
def test_a_run_that_never_uses_the_store_starts_no_server(
    project: Project, xdist: list[str],
) -> None:
    project.write(UNUSED)
    result = project.run(*xdist, "--shmstore-report")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*- shmstore -*",
                                 "no test used the shared store: no server was started"])


def test_importing_the_plugin_imports_nothing_heavy() -> None:
    code = ("import sys, shmstore.pytest_plugin; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('shmstore', 'msgpack', 'psutil')))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == ("['shmstore', 'shmstore.integrations', "
                           "'shmstore.integrations.pytest_plugin', 'shmstore.pytest_plugin']")


def test_the_package_still_exports_every_public_name() -> None:
    assert sorted(shmstore._EXPORTS) == sorted(shmstore.__all__)
    for name in shmstore.__all__:
        assert getattr(shmstore, name).__name__ == name
    with pytest.raises(AttributeError):
        _ = shmstore.no_such_name  # type: ignore[attr-defined]


def test_the_entry_point_names_the_plugin_module() -> None:
    tomllib = pytest.importorskip("tomllib")
    config: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())
    target = config["project"]["entry-points"]["pytest11"]["shmstore"]
    module = importlib.import_module(target)
    assert callable(module.pytest_addoption)
    assert {"checkpoint_store", "checkpoint_server"} <= set(dir(module))


# -- the report ----------------------------------------------------------------------------

REPORTED = """
from shmstore import Checkpoint

def test_saves(checkpoint_store):
    checkpoint_store.save(Checkpoint(execution_id="reported", state=b"x" * 1000))
"""


@pytest.mark.parametrize("xdist", XDIST_RUNS[:2])
def test_the_report_shows_store_and_memory_figures(project: Project, xdist: list[str]) -> None:
    project.write(REPORTED)
    result = project.run(*xdist, "--shmstore-report")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "*- shmstore -*",
        "server pid * at unix://*: checkpoints 1, executions 1, payload 100? B, "
        "server RSS *iB",
    ])
    if xdist:
        result.stdout.fnmatch_lines(["worker gw0 pid *: RSS *iB, peak RSS *iB"])
        result.stdout.fnmatch_lines(["worker gw1 pid *: RSS *iB, peak RSS *iB"])
    else:
        result.stdout.fnmatch_lines(["this process pid *: RSS *iB, peak RSS *iB"])


def test_without_the_option_there_is_no_report(project: Project) -> None:
    project.write(REPORTED)
    result = project.run()
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*- shmstore -*")


# -- an existing server ---------------------------------------------------------------------

EXTERNAL = """
import os
from shmstore import Checkpoint

def test_uses_the_given_server(checkpoint_store, checkpoint_server):
    assert not checkpoint_server.started_by_run
    checkpoint_store.save(Checkpoint(execution_id="external",
                                     node_name=os.environ.get("PYTEST_XDIST_WORKER", "main")))
    with open(os.path.join(OUT, "servers"), "a") as fh:
        fh.write(f"{checkpoint_server.pid} {checkpoint_server.url}\\n")
"""


@pytest.mark.parametrize("key_from", ["env", "connection-file"])
def test_shmstore_url_uses_an_existing_server_and_leaves_it_running(
    project: Project, monkeypatch: pytest.MonkeyPatch, key_from: str,
) -> None:
    project.write(EXTERNAL)
    connection_file = project.pytester.path / "server.json"
    with untagged_server(monkeypatch, connection_file=str(connection_file)) as server:
        if key_from == "env":
            monkeypatch.setenv("SHMSTORE_AUTHKEY", server.authkey.hex())
        else:
            monkeypatch.setenv("SHMSTORE_CONNECTION_FILE", str(connection_file))
        result = project.run("-n", "2", "--dist", "each", "--shmstore-url", server.url)
        result.assert_outcomes(passed=2)
        assert set(project.lines("servers")) == {f"{server.pid} {server.url}"}
        assert server.running  # not ours to stop
        with server.connect() as store:
            assert sorted(c.node_name for c in store.list("external")) == ["gw0", "gw1"]


def test_shmstore_url_without_an_authkey_fails_the_fixture_clearly(
    project: Project, monkeypatch: pytest.MonkeyPatch,
) -> None:
    project.write(EXTERNAL)
    with untagged_server(monkeypatch) as server:
        result = project.run("--shmstore-url", server.url)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*ConfigError: no authkey for --shmstore-url*SHMSTORE_AUTHKEY*SHMSTORE_CONNECTION_FILE*"])


@pytest.mark.parametrize(("url", "message"), [
    ("http://localhost:80", "*--shmstore-url: unsupported server URL*"),
])
def test_a_bad_shmstore_url_is_a_usage_error(project: Project, url: str, message: str) -> None:
    project.write(EXTERNAL)
    result = project.run("--shmstore-url", url)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


# -- memory per test ------------------------------------------------------------------------

LEAKY = """
import pytest

KEPT = []
MIB = 1024 * 1024

def test_leaks_40_mib():
    KEPT.append(bytes(range(256)) * (40 * MIB // 256))  # touched pages: RSS grows

@pytest.mark.parametrize("i", range(6))
def test_steady(i):
    assert sum(range(1000)) == 499500

@pytest.mark.shmstore_limit_growth("10 MiB")
def test_limited_and_leaking():
    KEPT.append(bytes(range(256)) * (24 * MIB // 256))

@pytest.mark.shmstore_limit_growth("10 MiB")
def test_limited_and_steady():
    scratch = bytes(range(256)) * (24 * MIB // 256)  # allocated, then given back
    assert len(scratch) == 24 * MIB

@pytest.mark.shmstore_limit_growth("ten megabytes")
def test_limited_badly():
    pass
"""


@pytest.mark.parametrize("xdist", XDIST_RUNS[:2])
def test_shmstore_memory_names_the_test_after_which_a_worker_grew(
        project: Project, xdist: list[str]) -> None:
    project.write(LEAKY)
    result = project.run(*xdist, "--shmstore-memory", "-p", "no:randomly")
    # the marker: the leaking limited test fails, the steady one passes, a bad size errors
    result.assert_outcomes(passed=8, failed=1, errors=1)
    result.stdout.fnmatch_lines([
        "*test_limited_and_leaking*: this process grew by 2?.? MiB during the test, more "
        "than the 10.0 MiB its @pytest.mark.shmstore_limit_growth allows*"])
    result.stdout.fnmatch_lines(["*'ten megabytes' is not a size*"])
    result.stdout.fnmatch_lines([
        "*- shmstore memory per test -*",
        "10 tests measured in * process*:",
    ])
    out = result.stdout.str()
    report = out[out.index("shmstore memory per test"):]
    ranked = [line for line in report.splitlines() if "::test_" in line]
    # the two tests that kept memory head the list, the one that kept 40 MiB first
    assert "test_leaks_40_mib" in ranked[0], report
    assert "test_limited_and_leaking" in ranked[1], report
    assert ranked[0].split()[0].startswith("+4"), report  # +40.x MiB
    if xdist:
        result.stdout.fnmatch_lines(["  gw0: * tests, RSS * -> *", "  gw1: * tests, RSS * -> *"])
    else:
        result.stdout.fnmatch_lines(["  main: 10 tests, RSS * -> * (+*)"])


def test_the_marker_works_without_the_option_and_saves_nothing(project: Project) -> None:
    project.write(LEAKY)
    result = project.run("-p", "no:randomly", "--shmstore-report")
    result.assert_outcomes(passed=8, failed=1, errors=1)
    result.stdout.no_fnmatch_line("*shmstore memory per test*")
    result.stdout.fnmatch_lines(["no test used the shared store: no server was started"])
