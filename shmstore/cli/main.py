"""The ``shmstore`` command: serve, stats, monitor, doctor, ls, show, rm, clear, dump,
load, demo.

Exit codes: 0 success; 1 not found (an unknown checkpoint or execution, nothing
matched); 2 usage errors, bad input, a store that is not there or refuses.

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
from ..core.errors import CheckpointNotFound, ConfigError, ShmstoreError
from ..core.stats import parse_bytes
from ..core.validate import duration

if TYPE_CHECKING:
    from ..core.config import Address
    from ..core.limits import Limits
    from ..core.store import BaseStore

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
            return _list_executions(store, args.json)
        records = store.list_records(args.execution, limit=args.limit,
                                     newest_first=args.newest_first)
    if not records:
        print(f"shmstore: no checkpoints in execution {args.execution!r}", file=sys.stderr)
        return 1
    rows = [{"version": r.version, "id": r.id, "node_name": r.node_name,
             "timestamp": _iso(r.timestamp_us), "parent_id": r.parent_id,
             "state_bytes": len(r.state)} for r in records]
    if args.json:
        _print_json(rows)
    else:
        for row in rows:
            print("\t".join(str(row[k]) for k in ("version", "id", "node_name", "timestamp",
                                                   "state_bytes")))
    return 0


def _list_executions(store: BaseStore, as_json: bool) -> int:
    """``shmstore ls``: each execution's checkpoints, bytes of state and latest save.

    No operation reports every execution's counts and bytes (``stats`` has the five
    largest), so each execution's records are listed, undecoded (`list_records`)."""
    from ..core.stats import format_bytes

    rows: list[dict[str, Any]] = []
    for name in store.executions():
        records = store.list_records(name)
        if records:  # emptied since executions() answered
            latest = records[-1]
            rows.append({"execution_id": name, "checkpoints": len(records),
                         "state_bytes": sum(len(r.state) for r in records),
                         "latest_version": latest.version,
                         "last_saved": _iso(latest.timestamp_us)})
    if as_json:
        _print_json(rows)
        return 0
    if not rows:
        print("shmstore: the store has no checkpoints", file=sys.stderr)
        return 0
    table = [("EXECUTION", "CHECKPOINTS", "STATE", "LATEST", "LAST SAVED")] + [
        (str(row["execution_id"]), str(row["checkpoints"]), format_bytes(row["state_bytes"]),
         str(row["latest_version"]), str(row["last_saved"])) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(5)]
    for line in table:
        print(f"{line[0]:<{widths[0]}}  {line[1]:>{widths[1]}}  {line[2]:>{widths[2]}}  "
              f"{line[3]:>{widths[3]}}  {line[4]}")
    return 0


def _iso(timestamp_us: int) -> str:
    from ..core.checkpoint import us_to_timestamp

    return us_to_timestamp(timestamp_us).isoformat()


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, default=repr))


def _cmd_show(args: argparse.Namespace) -> int:
    if (args.checkpoint_id is None) == (args.latest is None):
        args.subparser.error("give a checkpoint ID or --latest EXECUTION (one of them)")
    with _store(args) as store:
        if args.latest is None:
            cp = store.load(args.checkpoint_id)
        else:
            cp = store.latest(args.latest)
            if cp is None:
                print(f"shmstore: no checkpoints in execution {args.latest!r}",
                      file=sys.stderr)
                return 1
    shown = {"id": cp.id, "execution_id": cp.execution_id, "node_name": cp.node_name,
             "version": cp.version, "timestamp": cp.timestamp.isoformat(),
             "parent_id": cp.parent_id, "metadata": cp.metadata, "state": cp.state}
    if args.json:
        _print_json(shown)
        return 0
    for key in ("id", "execution_id", "node_name", "version", "timestamp", "parent_id"):
        print(f"{key + ':':<14}{shown[key]}")
    print(f"{'metadata:':<14}{json.dumps(cp.metadata, default=repr)}")
    print("state:")
    print(json.dumps(cp.state, indent=2, default=repr))
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    """``shmstore watch``: one line per checkpoint of an execution as it is saved."""
    from ..core.stream import Cleared

    seen = 0
    with _store(args) as store:
        for item in store.follow(args.execution, after_version=args.after_version,
                                 timeout=args.idle):
            if isinstance(item, Cleared):
                row: dict[str, Any] = {"cleared": item.execution_id,
                                       "last_version": item.last_version}
                text = (f"-- execution {item.execution_id!r} was emptied after version "
                        f"{item.last_version}; following it from version 1")
            else:
                seen += 1
                row = {"version": item.version, "id": item.id, "node_name": item.node_name,
                       "timestamp": item.timestamp.isoformat(), "parent_id": item.parent_id}
                text = "\t".join(str(row[k]) for k in ("version", "id", "node_name",
                                                        "timestamp"))
            print(json.dumps(row, default=repr) if args.json else text, flush=True)
            if args.count is not None and seen >= args.count:
                return 0
    # --idle ran out (or the store closed) before --count checkpoints came
    return 0 if args.count is None else 1


def _cmd_rm(args: argparse.Namespace) -> int:
    from ..core.checkpoint import validate_id

    ids = [validate_id(cid) for cid in args.checkpoint_ids]  # all, before deleting any
    with _store(args) as store:
        deleted = [cid for cid in dict.fromkeys(ids) if store.delete(cid)]
    missing = [cid for cid in dict.fromkeys(ids) if cid not in deleted]
    if args.json:
        _print_json({"deleted": deleted, "not_found": missing})
    else:
        print(f"deleted {_plural(len(deleted), 'checkpoint')}")
        for cid in missing:
            print(f"shmstore: no checkpoint {cid!r}", file=sys.stderr)
    return 1 if missing else 0


def _cmd_clear(args: argparse.Namespace) -> int:
    from ..core.checkpoint import validate_id

    if bool(args.all) == bool(args.executions):
        args.subparser.error("name the executions to clear, or pass --all (one of them)")
    names = [validate_id(name, "execution_id") for name in dict.fromkeys(args.executions)]
    if not args.yes and not sys.stdin.isatty():
        print("shmstore: clear asks before dropping checkpoints, and stdin is not a "
              "terminal: pass --yes to clear without asking", file=sys.stderr)
        return 2
    with _store(args) as store:
        if args.all:
            names = store.executions()
            if not names:
                print("shmstore: the store has no checkpoints; nothing to clear",
                      file=sys.stderr)
                return 0
        if not args.yes and not _confirm(
                f"drop every checkpoint of {_plural(len(names), 'execution')} "
                f"({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})?"):
            print("shmstore: nothing cleared", file=sys.stderr)
            return 1
        cleared = {name: store.clear(name) for name in names}
    missing = [name for name, dropped in cleared.items() if not dropped and not args.all]
    if args.json:
        _print_json({"cleared": cleared, "not_found": missing})
    else:
        for name, dropped in cleared.items():
            if dropped or args.all:
                print(f"{name}\t{dropped}")
        for name in missing:
            print(f"shmstore: no checkpoints in execution {name!r}", file=sys.stderr)
    return 1 if missing else 0


def _confirm(question: str) -> bool:
    """Ask on the terminal; True for y/yes."""
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _cmd_dump(args: argparse.Namespace) -> int:
    from .dump import Progress, dump_store, write_atomically

    if args.file == "-" and sys.stdout.isatty():
        raise ConfigError("a dump is binary and stdout is a terminal: redirect it "
                          "(shmstore dump - > FILE) or give a FILE", value="-")
    with _store(args) as store, Progress(enabled=args.progress) as bar:
        if args.file == "-":
            records, executions = dump_store(store, sys.stdout.buffer, progress=bar)
            sys.stdout.buffer.flush()
        else:
            with write_atomically(args.file) as out:
                records, executions = dump_store(store, out, progress=bar)
    print(f"dumped {_plural(records, 'checkpoint')} of {_plural(executions, 'execution')} "
          f"to {'stdout' if args.file == '-' else args.file}",
          file=sys.stderr if args.file == "-" else sys.stdout)
    return 0


def _cmd_load(args: argparse.Namespace) -> int:
    from .dump import Progress, load_dump, read_dump

    with Progress(enabled=args.progress) as bar:
        if args.file == "-":
            if sys.stdin.isatty():
                raise ConfigError("stdin is a terminal, not a dump: redirect one "
                                  "(shmstore load - < FILE) or give a FILE", value="-")
            dump = read_dump(sys.stdin.buffer, "stdin", progress=bar)
        else:
            try:
                stream = open(args.file, "rb")  # closed below (with)
            except OSError as exc:
                raise ConfigError(f"cannot read dump file {args.file!r}: "
                                  f"{exc.strerror or exc}", value=args.file) from None
            with stream:
                dump = read_dump(stream, args.file, size=os.fstat(stream.fileno()).st_size,
                                 progress=bar)
        with _store(args) as store:
            loaded = load_dump(store, dump, replace=args.replace, renumber=args.renumber,
                               progress=bar)
    print(f"loaded {_plural(sum(loaded.values()), 'checkpoint')} into "
          f"{_plural(len(loaded), 'execution')}")
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


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


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
        p.add_argument("--timeout", type=float, default=10.0, help="seconds per call "
                       "(default 10)")

    stats = sub.add_parser("stats", help="print a server's stats")
    client_options(stats)
    stats.add_argument("--json", action="store_true", help="as JSON")
    stats.set_defaults(func=_cmd_stats)

    ls = sub.add_parser(
        "ls", help="list executions (checkpoints, bytes of state, last save), or the "
        "checkpoints of one",
        description="Without EXECUTION: one line per execution with its checkpoints, the "
        "bytes of their states, its latest version and the timestamp of its latest "
        "checkpoint. With EXECUTION: one line per checkpoint (version, id, node, timestamp, "
        "bytes of state). Exit code 1 when the execution has no checkpoints.")
    client_options(ls)
    ls.add_argument("execution", nargs="?", help="list this execution's checkpoints")
    ls.add_argument("--limit", type=int,
                    help="at most this many checkpoints (the oldest; the newest with "
                    "--newest-first)")
    ls.add_argument("--newest-first", action="store_true", help="highest version first")
    ls.add_argument("--json", action="store_true", help="as JSON")
    ls.set_defaults(func=_cmd_ls)

    show = sub.add_parser(
        "show", help="print one checkpoint: by id, or an execution's latest",
        description="Print a checkpoint's fields and its state (values JSON cannot hold "
        "are shown as their repr). Exit code 1 when there is no such checkpoint.")
    client_options(show)
    show.add_argument("checkpoint_id", nargs="?", help="the checkpoint's id")
    show.add_argument("--latest", metavar="EXECUTION",
                      help="show this execution's latest checkpoint instead")
    show.add_argument("--json", action="store_true", help="as one JSON object")
    show.set_defaults(func=_cmd_show, subparser=show)

    watch = sub.add_parser(
        "watch", help="follow an execution: one line per checkpoint as it is saved",
        description="Print every checkpoint of EXECUTION in version order as it is saved "
        "(version, id, node, timestamp), waiting in the server between "
        "them; a clear of the execution is a line of its own, then it goes on from "
        "version 1. Ends on Ctrl-C, after --idle seconds without a new checkpoint, or "
        "after --count checkpoints (exit code 1 if --idle ran out first).")
    client_options(watch)
    watch.add_argument("execution", help="the execution to follow")
    watch.add_argument("--after-version", type=_non_negative_int, default=0, metavar="N",
                       help="start after this version (default 0: every checkpoint it has; "
                       "resume with the last version printed)")
    watch.add_argument("--idle", type=float, default=None, metavar="S",
                       help="stop after S seconds without a new checkpoint (default: never)")
    watch.add_argument("--count", type=_positive_int, default=None, metavar="N",
                       help="stop after N checkpoints")
    watch.add_argument("--json", action="store_true", help="one JSON object per line")
    watch.set_defaults(func=_cmd_watch)

    rm = sub.add_parser(
        "rm", help="delete checkpoints by id",
        description="Delete each checkpoint named. Exit code 1 when any was not found "
        "(the others are deleted).")
    client_options(rm)
    rm.add_argument("checkpoint_ids", nargs="+", metavar="ID", help="a checkpoint's id")
    rm.add_argument("--json", action="store_true", help="say what was deleted as JSON")
    rm.set_defaults(func=_cmd_rm)

    clear = sub.add_parser(
        "clear", help="drop every checkpoint of some executions, or of all",
        description="Drop every checkpoint of the executions named (or of all, --all) and "
        "say how many per execution. Asks first on a terminal; without one, --yes is "
        "needed (exit code 2 without it). Exit code 1 when a named execution had no "
        "checkpoints, or the answer was no.")
    client_options(clear)
    clear.add_argument("executions", nargs="*", metavar="EXECUTION",
                       help="an execution to clear")
    clear.add_argument("--all", action="store_true", help="clear every execution")
    clear.add_argument("--yes", "-y", action="store_true", help="do not ask")
    clear.add_argument("--json", action="store_true", help="say what was cleared as JSON")
    clear.set_defaults(func=_cmd_clear, subparser=clear)

    dump = sub.add_parser(
        "dump", help="write every checkpoint to a file (a msgpack stream, byte-exact)",
        description="Write every record as stored (ids, nodes, parents, versions, "
        "timestamps, metadata and state bytes, never decoded) to FILE: mode 0600, written "
        "beside it and renamed over it (a symlink there is replaced, not followed). "
        "`shmstore load` puts them into any store, a server or Redis.")
    client_options(dump)
    dump.add_argument("file", metavar="FILE", help="where to write ('-': stdout)")
    dump.add_argument("--no-progress", dest="progress", action="store_false",
                      help="no progress bar (there is one only when stderr is a terminal "
                      "and rich is installed: the [cli] extra)")
    dump.set_defaults(func=_cmd_dump)

    load = sub.add_parser(
        "load", help="put the checkpoints of a dump file into the store",
        description="Read FILE whole and check it (format, every record, its checksum) "
        "before saving anything; then save its records with their ids, versions, "
        "timestamps, metadata and state bytes. An execution that already has checkpoints "
        "is refused unless --replace, one whose versions have gaps unless --renumber (exit "
        "code 2, nothing loaded). If saving fails, the executions loaded so far are "
        "cleared again.")
    client_options(load)
    load.add_argument("file", metavar="FILE", help="the dump to read ('-': stdin)")
    load.add_argument("--replace", action="store_true",
                      help="clear the dump's executions in the store before loading them")
    load.add_argument("--renumber", action="store_true",
                      help="load executions whose versions have gaps (after deletes or "
                      "retention) as versions 1..n, in the same order")
    load.add_argument("--no-progress", dest="progress", action="store_false",
                      help="no progress bar (there is one only when stderr is a terminal "
                      "and rich is installed: the [cli] extra)")
    load.set_defaults(func=_cmd_load)

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
    except CheckpointNotFound as exc:
        print(f"shmstore: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1  # "not found", as for an unknown execution
    except ShmstoreError as exc:
        # Usage errors (ConfigError), bad input (DecodeError), a store that is not there
        # (StoreUnavailable, AccessDenied) or that refuses (StoreFull ...).
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
