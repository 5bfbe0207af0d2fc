"""The ``shmstore`` command: serve, stats, monitor, doctor, ls, show, demo.

Secrets never travel on the command line: a server's key comes from ``SHMSTORE_AUTHKEY``
or a connection file (``--connection-file`` / ``SHMSTORE_CONNECTION_FILE``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..core.backend import ROLE_CLI, ROLE_MONITOR
from ..core.errors import ConfigError, ShmstoreError
from ..core.stats import parse_bytes
from ..core.validate import duration

if TYPE_CHECKING:
    from ..core.config import Address
    from ..core.limits import Limits

__all__ = ["main"]


def _store(args: argparse.Namespace, role: str = ROLE_CLI) -> Any:
    """The store the command names; a server's client is in ``role`` (the store's own
    tools are hidden from its views by default)."""
    from ..core.config import ENV_CONNECTION_FILE, read_connection_file
    from ..core.factory import connect

    options: dict[str, Any] = {"timeout": args.timeout}
    if args.connection_file:
        url, key = read_connection_file(args.connection_file)
        store = connect(args.url or url, authkey=key, **options)
    elif (args.url is None and ENV_CONNECTION_FILE in os.environ
          and "SHMSTORE_URL" not in os.environ):
        url, key = read_connection_file(os.environ[ENV_CONNECTION_FILE])
        store = connect(url, authkey=key, **options)
    else:
        store = connect(args.url, **options)
    if hasattr(store, "role"):  # a server's client (Redis and memory stores have none)
        store.role = role
    return store


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..core.config import ENV_AUTHKEY, coerce_authkey
    from ..core.segment import available as segment_available
    from ..server.manager import run_server

    address, private_dir = _serve_address(args)
    key = coerce_authkey(os.environ.get(ENV_AUTHKEY))
    conn_file = args.connection_file
    if conn_file is None and ENV_AUTHKEY not in os.environ:
        # The key is random and must reach clients somehow: a private file, not stdout.
        private_dir = private_dir or tempfile.mkdtemp(prefix="shmstore-")
        conn_file = os.path.join(private_dir, "connection.json")
    if args.connection_file is not None:
        _private_parents(args.connection_file)
    ready = _Announce(conn_file, key)
    plane = args.data_plane and address.family == "AF_UNIX" and segment_available()
    limits = _limits(args, plane)
    try:
        run_server(address, key, on_ready=ready, stop_event=ready.stop, limits=limits,
                   monitor_interval=args.monitor_interval, history_size=args.history_size,
                   data_plane=plane)
    finally:
        # A connection file the server could not write is not ours to remove.
        _clean_up(None if ready.failed else args.connection_file, private_dir)
    if ready.failed is not None:
        raise ready.failed
    print("shmstore server stopped", flush=True)
    return 0


def _serve_address(args: argparse.Namespace) -> tuple[Address, str | None]:
    """Where to serve, and the private directory made for it (a socket in it by default).

    Raises:
        ConfigError: a bad URL, or a non-loopback one without ``--allow-remote``.
    """
    from ..core.config import parse_url

    address, private_dir = args.address, None
    if address is None:
        private_dir = tempfile.mkdtemp(prefix="shmstore-")
        address = f"unix://{private_dir}/store.sock"
    parsed = parse_url(address)
    if not parsed.is_loopback and not args.allow_remote:
        raise ConfigError(f"{parsed.url} is not a loopback address; add --allow-remote to "
                          "serve other machines", value=parsed.url)
    return parsed, private_dir


class _Announce:
    """The server's ``on_ready``: write the connection file, then say where it listens.

    A connection file that cannot be written stops the server cleanly (`stop`); the error
    is kept in `failed`, for the command to raise once the server is down.
    """

    def __init__(self, conn_file: str | None, key: bytes) -> None:
        self.conn_file, self.key = conn_file, key
        self.stop = threading.Event()
        self.failed: ConfigError | None = None

    def __call__(self, url: str) -> None:
        from ..core.config import write_connection_file

        if self.conn_file is not None:
            try:
                write_connection_file(self.conn_file, url, self.key, os.getpid())
            except ConfigError as exc:  # stop the server cleanly, then report it
                self.failed = exc
                self.stop.set()
                return
        print(f"shmstore server {os.getpid()} listening at {url}", flush=True)
        if self.conn_file is not None:
            print(f"export SHMSTORE_CONNECTION_FILE={self.conn_file}", flush=True)


def _limits(args: argparse.Namespace, data_plane: bool) -> Limits:
    """The limits ``serve``'s flags ask for."""
    from ..core.limits import Limits

    given = {"max_bytes": args.max_bytes, "max_checkpoints": args.max_checkpoints,
             "max_per_execution": args.max_per_execution, "max_rss": args.max_rss,
             "on_full": args.on_full}
    if hasattr(args, "max_checkpoint_bytes"):  # else the default, which the plane sets
        given["max_checkpoint_bytes"] = args.max_checkpoint_bytes
    return Limits.coerce(given, data_plane=data_plane)


def _clean_up(connection_file: str | None, private_dir: str | None) -> None:
    """Remove what ``serve`` made: the connection file it was given, its private directory."""
    if connection_file is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(connection_file)
    if private_dir is not None:
        shutil.rmtree(private_dir, ignore_errors=True)


def _private_parents(path: str) -> None:
    """Create the missing directories above ``path``, each mode 0700.

    Raises:
        ConfigError: a component is not a directory or cannot be created.
    """
    directory = os.path.dirname(os.path.abspath(path))
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise ConfigError(f"cannot create the directory of connection file {path!r}: "
                                  f"{directory!r} exists and is not a directory; choose "
                                  "another path", value=path) from None
        except OSError as exc:
            raise ConfigError(f"cannot create the directory {directory!r} of connection file "
                              f"{path!r}: {exc.strerror or exc}; create it or choose another "
                              "path", value=path) from None


def _cmd_stats(args: argparse.Namespace) -> int:
    with _store(args) as store:
        stats = store.stats()
    if args.json:
        print(json.dumps(stats.to_dict(), indent=2, sort_keys=True))
    else:
        print(stats)
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    with _store(args) as store:
        if args.execution is None:
            for name in store.executions():
                latest = store.latest(name)
                print(f"{name}\t{latest.version if latest else 0}")
            return 0
        checkpoints = store.list(args.execution, limit=args.limit,
                                 newest_first=args.newest_first)
    if not checkpoints:
        print(f"shmstore: no checkpoints in execution {args.execution!r}", file=sys.stderr)
        return 1
    for cp in checkpoints:
        print(f"{cp.version}\t{cp.id}\t{cp.node_name}\t{cp.timestamp.isoformat()}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    with _store(args) as store:
        cp = store.load(args.checkpoint_id)
    print(json.dumps({
        "id": cp.id, "execution_id": cp.execution_id, "node_name": cp.node_name,
        "version": cp.version, "timestamp": cp.timestamp.isoformat(),
        "parent_id": cp.parent_id, "metadata": cp.metadata, "state": cp.state,
    }, indent=2, default=repr))
    return 0


def _cmd_monitor(args: argparse.Namespace) -> int:
    from ..monitor.export import require_matplotlib
    from ..monitor.view import MONITOR_NAME, run_monitor

    if args.plot is not None:
        require_matplotlib()  # before connecting, not after a long recording
    store = _store(args, role=ROLE_MONITOR)
    store.name = MONITOR_NAME  # how the server lists this process among its clients
    with store:
        return run_monitor(store, refresh=args.interval, duration=args.duration,
                           csv_path=args.csv, plot_path=args.plot, window=args.window,
                           backlog=args.backlog, plain=args.plain, show_tools=args.all)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from ..monitor.doctor import diagnose, format_diagnosis
    from ..monitor.recorder import MemoryRecorder

    store = _store(args, role=ROLE_MONITOR)
    store.name = "shmstore-doctor"  # a tool: never judged among the workers
    with store:
        recorder = MemoryRecorder(store, trend=1_000_000, trend_seconds=args.window)
        diagnosis = diagnose(recorder, exclude_pids=frozenset({os.getpid()}))
    if args.json:
        print(json.dumps(diagnosis.to_dict(), indent=2, sort_keys=True))
    else:
        print(format_diagnosis(diagnosis))
    return 0


def _positive_seconds(text: str) -> float:
    try:
        return duration(float(text), "seconds")
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, not {text}"
                                         ) from None


def _window(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"a growth rate needs >= 2 samples, not {value}")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_text, rich_renderables, run_demo

    console = None
    if not args.plain:
        try:
            from rich.console import Console

            console = Console()
        except ImportError:  # the [cli] extra is not installed: plain text
            pass
    print(f"shmstore demo: {args.executions} executions of fetch -> transform -> report on "
          f"{args.processes} worker process{'es' if args.processes > 1 else ''} and one server"
          + ("; one worker will be killed mid-step" if not args.no_kill else ""), flush=True)
    report = run_demo(executions=args.executions, processes=args.processes, delay=args.delay,
                      kill=not args.no_kill, progress=console is not None)
    if console is None:
        print(format_text(report))
    else:
        for renderable in rich_renderables(report):
            console.print(renderable, highlight=False, soft_wrap=isinstance(renderable, str))
    return 0 if report.ok else 1


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def _size(text: str) -> int | None:
    """A byte count: ``1048576``, ``512MiB``, ``2GB``; ``none`` for no limit."""
    if text.strip().lower() in ("none", "off", "0"):
        return None
    try:
        return parse_bytes(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or none)") from None


def _count(text: str) -> int | None:
    if text.strip().lower() in ("none", "off"):
        return None
    return _positive_int(text)


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 10:
        raise argparse.ArgumentTypeError(f"must be between 0 and 10 seconds, not {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmstore", description="A shared, non-persistent checkpoint store."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a server in the foreground")
    serve.add_argument("--address", help="unix:///path.sock or tcp://127.0.0.1:PORT "
                       "(default: a socket in a private temp directory)")
    serve.add_argument("--connection-file", help="write url, authkey and pid here (mode 0600); "
                       "missing parent directories are created with mode 0700")
    serve.add_argument("--allow-remote", action="store_true",
                       help="allow a non-loopback TCP host")
    limits = serve.add_argument_group("limits", "what the store may hold (sizes: 512MiB, 2GB, "
                                      "bytes; 'none' for no limit)")
    limits.add_argument("--max-bytes", type=_size, help="payload bytes store-wide")
    limits.add_argument("--max-checkpoints", type=_count, help="checkpoints store-wide")
    limits.add_argument("--max-per-execution", type=_count, metavar="N",
                        help="keep the newest N checkpoints of each execution")
    limits.add_argument("--max-checkpoint-bytes", type=_size, default=argparse.SUPPRESS,
                        help="one checkpoint's encoded size (default 64MiB; 4GiB with the "
                        "data plane)")
    limits.add_argument("--max-rss", type=_size,
                        help="refuse saves while the server's RSS is above this")
    limits.add_argument("--on-full", choices=("reject", "evict"), default="reject",
                        help="reject: StoreFull (default); evict: drop the oldest store-wide")
    serve.add_argument("--no-data-plane", dest="data_plane", action="store_false",
                       help="keep every state as bytes on the socket (default on a unix "
                       "socket: large states travel as sealed shared memory)")
    serve.add_argument("--monitor-interval", type=float, default=0.5,
                       help="seconds between memory samples (default 0.5)")
    serve.add_argument("--history-size", type=_positive_int, default=1200,
                       help="memory samples kept (default 1200)")
    serve.set_defaults(func=_cmd_serve)

    def client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", help="server URL (default: SHMSTORE_URL)")
        p.add_argument("--connection-file", help="read url and authkey from this file")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds per call")

    stats = sub.add_parser("stats", help="print a server's stats")
    client_options(stats)
    stats.add_argument("--json", action="store_true", help="as JSON")
    stats.set_defaults(func=_cmd_stats)

    ls = sub.add_parser("ls", help="list executions, or the checkpoints of one")
    client_options(ls)
    ls.add_argument("execution", nargs="?")
    ls.add_argument("--limit", type=int)
    ls.add_argument("--newest-first", action="store_true")
    ls.set_defaults(func=_cmd_ls)

    show = sub.add_parser("show", help="print one checkpoint as JSON")
    client_options(show)
    show.add_argument("checkpoint_id")
    show.set_defaults(func=_cmd_show)

    monitor = sub.add_parser(
        "monitor", help="watch server and client memory live, or record it to CSV and PNG",
        description="A live view of the server's and its clients' memory, growth rates and "
        "payload bytes; Ctrl-C stops it. With --duration and --csv or --plot, records for "
        "that long without a live view. Exit code 1 when the server goes away.")
    client_options(monitor)
    monitor.add_argument("--interval", type=_positive_seconds, default=0.5,
                         help="seconds between refreshes (default 0.5); samples are taken "
                         "by the server, none is missed")
    monitor.add_argument("--duration", type=_positive_seconds,
                         help="stop after this many seconds (with --csv or --plot: record "
                         "without a live view)")
    monitor.add_argument("--csv", metavar="FILE", help="write the samples here: columns t, "
                         "process (server or pid/name), rss, uss, alive, payload_bytes, "
                         "checkpoints")
    monitor.add_argument("--plot", metavar="FILE.png", help="draw memory over time here (needs "
                         "matplotlib: the [cli] extra)")
    monitor.add_argument("--window", type=_window, default=10,
                         help="growth rates over this many newest samples (default 10)")
    monitor.add_argument("--backlog", action="store_true",
                         help="also record the samples the server took before the monitor "
                         "started (up to its history size)")
    monitor.add_argument("--plain", action="store_true",
                         help="one plain line per new sample instead of the rich table")
    monitor.add_argument("--all", action="store_true",
                         help="also show the store's own tools (shmstore monitor, stats, "
                         "doctor) among the clients")
    monitor.set_defaults(func=_cmd_monitor)

    doctor = sub.add_parser(
        "doctor", help="say who grows, by how much, whether the store explains it",
        description="Judge the server and every registered client from the server's memory "
        "history (no waiting: the server samples all along): steady, growing (grew, then "
        "stopped) or leaking (grows and does not stop), by a robust slope (Theil-Sen) and "
        "its 95%% interval; the server's growth net of its payload. Plain words, the worst "
        "first, with what to try.")
    client_options(doctor)
    doctor.add_argument("--window", type=_positive_seconds, default=60.0,
                        help="judge the newest this many seconds of samples (default 60)")
    doctor.add_argument("--json", action="store_true", help="as JSON")
    doctor.set_defaults(func=_cmd_doctor)

    demo = sub.add_parser("demo", help="run a checkpointed pipeline across processes, kill a "
                          "worker, and watch it resume")
    demo.add_argument("--executions", type=_positive_int, default=12,
                      help="executions to run (default 12)")
    demo.add_argument("--processes", type=_positive_int, default=4,
                      help="worker processes (default 4)")
    demo.add_argument("--delay", type=_seconds, default=0.25,
                      help="seconds each step takes (default 0.25)")
    demo.add_argument("--no-kill", action="store_true", help="do not kill a worker")
    demo.add_argument("--plain", action="store_true",
                      help="plain text, no progress bar (the default without rich)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ShmstoreError as exc:
        print(f"shmstore: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`shmstore monitor --plain | head`): stop quietly, and keep
        # the interpreter's final flush from failing on the closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
