"""Every duration and interval a user passes is checked by one validator, at once.

NaN, infinities where a finite value is needed, negatives and values past what the OS
accepts as a wait are `ConfigError` where they are given, never a bare `OverflowError`
from the first call that uses them, and never a spinning sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

import shmstore
from shmstore import ConfigError
from shmstore.core.validate import MAX_SECONDS, count, duration, optional_duration
from shmstore.integrations.pipeline import CheckpointConfig
from shmstore.monitor.sampler import MemoryMonitor

BAD_SECONDS = [math.nan, math.inf, -math.inf, -1.0, MAX_SECONDS * 2, 1e300, "5", True, None]


@pytest.mark.parametrize("value", BAD_SECONDS, ids=repr)
def test_a_bad_duration_is_config_error_naming_the_parameter(value: Any) -> None:
    with pytest.raises(ConfigError, match="timeout") as info:
        duration(value, "timeout")
    assert type(info.value) is ConfigError


@pytest.mark.parametrize("value", [0.001, 1, 2.5, MAX_SECONDS])
def test_a_good_duration_comes_back_as_a_float(value: float) -> None:
    assert duration(value, "timeout") == float(value)
    assert type(duration(value, "timeout")) is float


def test_zero_and_none_are_allowed_only_where_asked() -> None:
    with pytest.raises(ConfigError):
        duration(0, "timeout")
    assert duration(0, "timeout", zero=True) == 0.0
    assert optional_duration(None, "timeout") is None
    with pytest.raises(ConfigError):
        optional_duration(math.nan, "timeout")


@pytest.mark.parametrize("value", [-1, 1.5, True, "3", 2**63])
def test_a_bad_count_is_config_error(value: Any) -> None:
    with pytest.raises(ConfigError, match="limit"):
        count(value, "limit")


def _connect(value: Any) -> Any:
    return shmstore.connect("unix:///nonexistent/shmstore.sock", authkey=b"k" * 32,
                            timeout=value)


def _serve(value: Any) -> Any:
    return shmstore.serve(export=False, monitor_interval=value)


def _monitor(value: Any) -> Any:
    return MemoryMonitor(lambda: (0, 0), interval=value)


def _wait(value: Any) -> Any:
    return shmstore.MemoryStore().wait("run", timeout=value)


def _pipeline(value: Any) -> Any:
    return CheckpointConfig(auto_save=False, save_interval=value)


ENTRY_POINTS: dict[str, Callable[[Any], Any]] = {
    "connect(timeout=)": _connect,
    "serve(monitor_interval=)": _serve,
    "MemoryMonitor(interval=)": _monitor,
    "store.wait(timeout=)": _wait,
    "CheckpointConfig(save_interval=)": _pipeline,
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 1e300], ids=repr)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_refuses_a_bad_duration_before_it_starts_anything(
        entry: str, value: float) -> None:
    with pytest.raises(ConfigError) as info:
        ENTRY_POINTS[entry](value)
    assert type(info.value) is ConfigError
    assert "finite" in str(info.value) or "positive" in str(info.value) \
        or "number" in str(info.value), str(info.value)
