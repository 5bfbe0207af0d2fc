"""One validator for every duration and count an option takes.

Every timeout, interval, lease and count in the package is checked here, so that they all
refuse the same things with the same kind of message: a value of the wrong type, nan,
infinity where a finite value is needed, a negative or zero where it is not allowed, and a
value past what the OS accepts (``select``, ``poll``, ``threading`` waits and socket
timeouts all overflow beyond `MAX_SECONDS`).

Example:
    >>> duration(2, "timeout")
    2.0
    >>> duration(float("nan"), "timeout")
    Traceback (most recent call last):
    ...
    shmstore.errors.ConfigError: timeout must be a number > 0 (seconds), not nan
"""

from __future__ import annotations

import math
import threading
from typing import Literal, overload

from .errors import ConfigError

__all__ = ["MAX_COUNT", "MAX_SECONDS", "count", "duration", "optional_duration"]

# The longest wait every blocking primitive takes: threading's bound (about 292 years),
# also below what select() and SO_RCVTIMEO accept.
MAX_SECONDS = float(threading.TIMEOUT_MAX)
# What a msgpack signed integer holds.
MAX_COUNT = 2**63 - 1


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _refuse(name: str, value: object, zero: bool, optional: bool, why: str = "") -> ConfigError:
    bound = ">= 0" if zero else "> 0"
    none = " or None" if optional else ""
    return ConfigError(f"{name} must be a number {bound}{none} (seconds){why}, not {value!r:.80}",
                       option=name, value=repr(value)[:80])


def duration(value: object, name: str, *, zero: bool = False) -> float:
    """Check a number of seconds and return it as a float.

    Parameters:
        value: the value given.
        name: the option's name, for the message.
        zero: whether 0 is allowed (otherwise the value must be > 0).

    Raises:
        ConfigError: not a number, nan, infinite, negative (or zero when not allowed), or
            over `MAX_SECONDS`.
    """
    return _duration(value, name, zero=zero, optional=False)


def optional_duration(value: object, name: str, *, zero: bool = True) -> float | None:
    """Like `duration`, but ``None`` (no limit) is allowed and returned as it is.

    Infinity is refused with a message that points at ``None``.
    """
    if value is None:
        return None
    return _duration(value, name, zero=zero, optional=True)


def _duration(value: object, name: str, *, zero: bool, optional: bool) -> float:
    if not _number(value):
        raise _refuse(name, value, zero, optional)
    seconds = float(value)  # type: ignore[arg-type]
    if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not zero):
        raise _refuse(name, value, zero, optional)
    if math.isinf(seconds) and optional:
        raise _refuse(name, value, zero, optional, "; use None to wait without a limit")
    if seconds > MAX_SECONDS:
        raise _refuse(name, value, zero, optional, f" and finite, at most {MAX_SECONDS:.0f}")
    return seconds


@overload
def count(value: object, name: str, *, minimum: int = ...,
          optional: Literal[False] = ...) -> int: ...
@overload
def count(value: object, name: str, *, minimum: int = ..., optional: bool) -> int | None: ...
def count(value: object, name: str, *, minimum: int = 0, optional: bool = False) -> int | None:
    """Check an integer count (not a bool) of at least ``minimum``; ``None`` if optional.

    Raises:
        ConfigError: not an int, below ``minimum`` or over `MAX_COUNT`.
    """
    if value is None and optional:
        return None
    if type(value) is not int or not minimum <= value <= MAX_COUNT:
        none = " or None (no limit)" if optional else ""
        raise ConfigError(f"{name} must be an int >= {minimum}{none}, not {value!r:.80}",
                          option=name, value=repr(value)[:80])
    return value
