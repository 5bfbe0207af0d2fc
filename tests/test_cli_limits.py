"""``shmstore serve`` limit flags and ``shmstore stats`` output, through real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import shmstore
from shmstore import Checkpoint, StoreFull
from shmstore.cli.main import _size

from .helpers import reap


def _serve(conn: Path, *flags: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmstore", "serve", "--connection-file", str(conn), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    assert "listening" in proc.stdout.readline()
    return proc


def _stats(conn: Path, *flags: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "shmstore", "stats", "--connection-file", str(conn), *flags],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout


def test_serve_enforces_the_limits_given_as_flags(tmp_path: Path) -> None:
    conn = tmp_path / "conn.json"
    proc = _serve(conn, "--max-checkpoints", "3", "--on-full", "evict", "--max-per-execution",
                  "2", "--max-checkpoint-bytes", "1KiB", "--max-bytes", "1MiB")
    try:
        data = json.loads(conn.read_text())
        with shmstore.connect(data["url"], authkey=data["authkey"]) as store:
            for name in ("a", "a", "a", "b", "c"):
                store.save(Checkpoint(execution_id=name, state=name))
            with pytest.raises(StoreFull, match="max_checkpoint_bytes=1024"):
                store.save(Checkpoint(execution_id="d", state="x" * 2000))
            assert sorted(store.executions()) == ["a", "b", "c"]  # a's oldest went first
        stats = json.loads(_stats(conn, "--json"))
        assert stats["limits"] == {
            "max_bytes": 1024**2, "max_checkpoints": 3, "max_per_execution": 2,
            "max_checkpoint_bytes": 1024, "max_rss": None, "on_full": "evict"}
        assert (stats["pruned"], stats["evictions"], stats["checkpoints"]) == (1, 1, 3)
        assert stats["server_peak_rss"] >= stats["server_rss"] > 0
        text = _stats(conn)
        assert "3 checkpoints in 3 executions" in text
        assert "on_full=evict" in text and "evictions 1" in text
    finally:
        proc.terminate()
        reap(proc)


def test_a_bad_size_flag_says_how_to_write_one(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "shmstore", "serve", "--max-bytes", "12XB"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert "'12XB' is not a size" in out.stderr and "512MiB" in out.stderr


@pytest.mark.parametrize(("text", "value"), [
    ("1048576", 1048576), ("512MiB", 512 * 1024**2), ("2GB", 2 * 1000**3), ("1.5KiB", 1536),
    ("none", None),
])
def test_sizes_parse(text: str, value: int | None) -> None:
    assert _size(text) == value
