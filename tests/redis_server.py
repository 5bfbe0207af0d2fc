"""A throwaway ``redis-server`` for tests: started in a private temp dir, always stopped.

The server listens on a unix socket in a 0700 directory (or on a free loopback port with
``tcp=True``), keeps nothing on disk, and reads its configuration from stdin, so that a
password never appears on a command line.  Without ``redis-server`` (or redis-py) the
tests that need it skip with a message saying how to enable them, unless
``SHMSTORE_REQUIRE_REDIS=1`` (set by ``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

import pytest

ENV_REQUIRE = "SHMSTORE_REQUIRE_REDIS"
ENABLE_HINT = ("install redis-server (apt-get install redis-server) and redis-py "
               "(pip install -e '.[redis]') to run them; SHMSTORE_REQUIRE_REDIS=1 turns this "
               "skip into a failure")


def unavailable(reason: str) -> None:
    """Skip (or fail, when Redis is required) the calling test or fixture."""
    message = f"Redis tests need a Redis server: {reason}; {ENABLE_HINT}"
    if os.environ.get(ENV_REQUIRE) == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def redis_server_binary() -> str:
    """The path of ``redis-server``, or skip/fail with how to get it."""
    try:
        import redis  # noqa: F401
    except ImportError:
        unavailable("redis-py is not installed")
    path = shutil.which("redis-server")
    if path is None:
        unavailable("redis-server is not on PATH")
    assert path is not None
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process of a test's own.

    Parameters:
        maxmemory: bytes for Redis' ``maxmemory`` (policy noeviction), or None.
        password: ``requirepass``, sent on stdin.
        tcp: listen on a free 127.0.0.1 port instead of a unix socket.
    """

    def __init__(self, *, maxmemory: int | None = None, password: str | None = None,
                 tcp: bool = False) -> None:
        self.binary = redis_server_binary()
        self.dir = tempfile.mkdtemp(prefix="shmstore-redis-")  # mode 0700
        self.socket_path = os.path.join(self.dir, "redis.sock")
        self.port = _free_port() if tcp else 0
        self.password = password
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"redis+unix://{self.socket_path}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def config(self) -> str:
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {self.dir}",
            'save ""',
            "appendonly no",
            "daemonize no",
            f"logfile {os.path.join(self.dir, 'redis.log')}",
            "databases 4",
            # Blocked clients time out on the server's clock tick: 100 per second, not 10.
            "hz 100",
        ]
        if not self.port:
            lines += [f"unixsocket {self.socket_path}", "unixsocketperm 700"]
        if self.maxmemory is not None:
            lines += [f"maxmemory {self.maxmemory}", "maxmemory-policy noeviction"]
        if self.password is not None:
            lines.append(f"requirepass {self.password}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> RedisServer:
        self.proc = subprocess.Popen([self.binary, "-"], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert self.proc.stdin is not None
        self.proc.stdin.write(self.config().encode())
        self.proc.stdin.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self._answers():
                return self
            time.sleep(0.02)
        log = self.log()
        self.stop()
        unavailable(f"redis-server did not start: {log[-500:]}")
        return self

    def _answers(self) -> bool:
        try:
            if self.port:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    return self._ping(sock)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1)
                sock.connect(self.socket_path)
                return self._ping(sock)
        except OSError:
            return False

    @staticmethod
    def _ping(sock: socket.socket) -> bool:
        sock.sendall(b"PING\r\n")
        reply = sock.recv(64)
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log")) as fh:
                return fh.read()
        except OSError:
            return ""

    def client(self, **options: Any) -> Any:
        """A plain redis-py client of this server (for setup and inspection)."""
        import redis

        if self.password is not None:
            options.setdefault("password", self.password)
        if self.port:
            return redis.Redis(host="127.0.0.1", port=self.port, **options)
        return redis.Redis(unix_socket_path=self.socket_path, **options)

    def flush(self) -> None:
        """Empty every database of this server."""
        client = self.client()
        try:
            client.flushall()
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: the server vanishes as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
