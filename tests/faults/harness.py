"""A shmstore server in a child process that the fault tests can look inside.

It is the real `run_server`, started from this module instead of `serve()` so that the
child can, before it imports shmstore:

- trap every way to unpickle (``pickle.loads``/``load``/``Unpickler``, ``_pickle``'s, the
  ``ForkingPickler`` the stdlib connections use) and count ``pickle.find_class`` audit
  events: a test then asks whether anything was unpickled;
- trace Python allocations (`tracemalloc`), so a test can read the peak the server
  reached while a peer misbehaved;
- shorten `FRAME_TIMEOUT` and `HANDSHAKE_TIMEOUT`, so a stalled peer is dropped in
  well under a second instead of ten.

The configuration (authkey included) goes over stdin; commands follow on stdin, one a
line, each answered with one JSON line; EOF stops the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD_CODE = "from tests.faults.harness import child_main; child_main()"


def _install_traps(unpickles: list[str]) -> None:
    import _pickle
    import pickle
    from multiprocessing import reduction

    def trap(name: str) -> Any:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            unpickles.append(name)
            raise RuntimeError(f"{name} called in the server")
        return refuse

    pickle.loads = trap("pickle.loads")
    pickle.load = trap("pickle.load")
    _pickle.loads = trap("_pickle.loads")  # type: ignore[attr-defined]
    _pickle.load = trap("_pickle.load")  # type: ignore[attr-defined]
    reduction.ForkingPickler.loads = trap("ForkingPickler.loads")  # type: ignore[assignment]

    class TrappedUnpickler(pickle.Unpickler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            unpickles.append("pickle.Unpickler")
            raise RuntimeError("pickle.Unpickler used in the server")

    pickle.Unpickler = TrappedUnpickler  # type: ignore[misc]

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if event == "pickle.find_class":
            unpickles.append(f"find_class{args!r}")

    sys.addaudithook(audit)


def child_main() -> None:
    """Entry point of the harness child."""
    import threading
    import tracemalloc

    config = json.loads(sys.stdin.readline())
    unpickles: list[str] = []
    _install_traps(unpickles)
    if config.get("trace"):
        tracemalloc.start()

    import psutil

    from shmstore.backends import wire
    from shmstore.server import manager as server

    for module in (server, wire):
        module.FRAME_TIMEOUT = config["frame_timeout"]  # type: ignore[attr-defined]
    wire.HANDSHAKE_TIMEOUT = config["handshake_timeout"]
    stop = threading.Event()
    ready = threading.Event()
    urls: list[str] = []

    def on_ready(url: str) -> None:
        urls.append(url)
        ready.set()

    def run() -> None:
        server.run_server(wire.parse_url(config["url"]), bytes.fromhex(config["authkey"]),
                          on_ready=on_ready, stop_event=stop,
                          monitor_interval=config["monitor_interval"])

    thread = threading.Thread(target=run, name="harness-server", daemon=True)
    thread.start()
    ready.wait(30)
    out = sys.stdout
    out.write(json.dumps({"url": urls[0], "pid": os.getpid()}) + "\n")
    out.flush()
    me = psutil.Process()
    for line in sys.stdin:
        command = line.strip()
        answer: dict[str, Any] = {}
        if command == "reset_peak" and tracemalloc.is_tracing():
            tracemalloc.reset_peak()
            answer["current"] = tracemalloc.get_traced_memory()[0]
        elif command == "report":
            if tracemalloc.is_tracing():  # first: what follows allocates too
                answer["current"], answer["peak"] = tracemalloc.get_traced_memory()
            answer["unpickles"] = list(unpickles)
            answer["threads"] = me.num_threads()
            answer["fds"] = me.num_fds()
        out.write(json.dumps(answer) + "\n")
        out.flush()
    stop.set()
    thread.join(10)
    os._exit(0)


class HarnessServer:
    """Start the harness child; ``with`` stops it and reaps it.

    Attributes:
        url, authkey, pid: as for a `StoreServer`.
    """

    def __init__(self, url: str, *, frame_timeout: float = 0.5,
                 handshake_timeout: float = 0.5, trace: bool = False,
                 monitor_interval: float = 0.5) -> None:
        self.authkey = os.urandom(32)
        env = {**os.environ, "PYTHONPATH": ROOT}
        self._proc = subprocess.Popen([sys.executable, "-c", CHILD_CODE], cwd=ROOT, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({
            "url": url, "authkey": self.authkey.hex(), "frame_timeout": frame_timeout,
            "handshake_timeout": handshake_timeout, "trace": trace,
            "monitor_interval": monitor_interval}) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError("the harness server did not start (see stderr)")
        ready = json.loads(line)
        self.url: str = ready["url"]
        self.pid: int = ready["pid"]

    def command(self, name: str) -> dict[str, Any]:
        """Send one command; return its JSON answer."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(name + "\n")
        self._proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self._proc.stdout.readline())
        return answer

    def connect(self, **options: Any) -> Any:
        from shmstore import SharedStore

        return SharedStore(self.url, authkey=self.authkey, **options)

    def close(self) -> None:
        proc = self._proc
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None and not pipe.closed:
                try:
                    pipe.close()
                except OSError:
                    pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def __enter__(self) -> HarnessServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
