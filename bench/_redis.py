"""A private redis-server for the benchmarks: unix socket, no persistence, config on stdin."""

from __future__ import annotations

import os
import shutil
import subprocess
import time


def start_redis(tmp: str, extra_config: str = "") -> tuple[subprocess.Popen[bytes], str] | None:
    """A redis-server on a unix socket in ``tmp``, or None when there is no redis-server.

    ``extra_config`` adds configuration lines (``"hz 100\\n"``); it returns once the server
    answers a PING, with the process and the socket's path.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    sock = os.path.join(tmp, "redis.sock")
    config = (f"port 0\nunixsocket {sock}\nunixsocketperm 700\nsave \"\"\n"
              f"appendonly no\ndir {tmp}\n{extra_config}")
    proc = subprocess.Popen([binary, "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    proc.stdin.write(config.encode())
    proc.stdin.close()
    import redis

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if redis.Redis(unix_socket_path=sock).ping():
                return proc, sock
        except redis.ConnectionError:
            time.sleep(0.05)  # polling a server we started for its socket, not a test
    proc.kill()
    proc.wait()
    raise RuntimeError("redis-server did not start")
