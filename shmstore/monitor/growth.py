"""Growth analysis: a robust slope of a memory series, its confidence, and a verdict.

A memory series (RSS of a process, sampled every half second or so) is noisy: the
allocator grows in steps, a garbage collection drops it, a burst of work raises it for a
while.  A least-squares line follows those outliers; the Theil-Sen estimator (the median
of the slopes between every pair of samples) does not, and Sen's rank method gives it a
confidence interval without assuming normal noise (Sen 1968, the Mann-Kendall variance).

`analyze` turns a window of ``(t, value)`` samples into a `Growth`:

- ``warming up``: too few samples, or too short a window, to say anything yet;
- ``steady``: the slope's lower confidence bound is not above the noise floor (a rate
  below ``max(FLOOR_BYTES_PER_MIN, FLOOR_SHARE_PER_MIN * the series' level)``), or the
  growth is explained (``explained``: e.g. the server's payload grew as much);
- ``growing``: it grew significantly over the window, but not in its recent half (a
  cache filling up, a warm-up that ends), or by less than a leak's least growth over the
  window (``max(LEAK_MIN_BYTES, LEAK_MIN_SHARE * level)``: buffers that follow the
  largest state a process handles grow too, a few MiB, and stop);
- ``leaking``: it grew significantly over the window *and* over its recent half, by at
  least a leak's least growth: growth that does not stop.

The server's growth is judged on RSS minus payload (what the store keeps explains its
own growth); a client's on its RSS.  Nothing here reads a process: the samples come
from the server's history (`BaseStore.memory_history`).

Example:
    >>> g = analyze([(t, 100e6 + 2e6 * t) for t in range(60)])
    >>> g.verdict, round(g.per_minute / 1e6)
    ('leaking', 120)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.stats import format_bytes

__all__ = ["FLOOR_BYTES_PER_MIN", "FLOOR_SHARE_PER_MIN", "LEAK_MIN_BYTES", "LEAK_MIN_SHARE",
           "MIN_SAMPLES", "MIN_SPAN",
           "Growth", "analyze", "bytes_per_explaining_byte", "format_per_minute",
           "theil_sen"]

#: Fewer samples than this, or a window shorter than this many seconds: ``warming up``.
MIN_SAMPLES = 8
MIN_SPAN = 4.0
#: The noise floor: growth below the larger of these is ``steady`` (1 MiB a minute, or
#: 1% of the series' level a minute).
FLOOR_BYTES_PER_MIN = 1024 * 1024
FLOOR_SHARE_PER_MIN = 0.01
#: A leak has grown by at least the larger of these over the window (16 MiB, or 5% of
#: the series' level); less is ``growing``.
LEAK_MIN_BYTES = 16 * 1024 * 1024
LEAK_MIN_SHARE = 0.05
#: Pairwise slopes are O(n²): a longer window is thinned to this many samples, evenly.
MAX_POINTS = 240
#: A byte of payload explains at most this many bytes of server growth (the heap's own
#: overhead: record headers, allocator slack); beyond it, growth is the server's own.
MAX_EXPLAINED_RATIO = 3.0
# Payload changes smaller than this between two samples say nothing about the ratio.
MIN_EXPLAINING_CHANGE = 64 * 1024
# Two-sided 95% normal quantile, for Sen's interval.
_Z = 1.959963984540054

VERDICTS = ("warming up", "steady", "growing", "leaking")


@dataclass(frozen=True)
class Growth:
    """How a series grew over a window.

    Attributes:
        verdict: ``warming up``, ``steady``, ``growing`` or ``leaking``.
        slope: the Theil-Sen slope, in bytes per second (what is judged: net of
            ``explained``).
        low, high: its 95% confidence interval, bytes per second.
        floor: the noise floor it was judged against, bytes per second.
        recent: the slope over the recent half of the window (bytes per second).
        explained: bytes per second of growth accounted for elsewhere (the server's
            payload), already taken out of ``slope``.
        span: seconds the window covers; samples: how many it holds.
        level: the median value of the series.
    """

    verdict: str
    slope: float
    low: float
    high: float
    floor: float
    recent: float
    explained: float
    span: float
    samples: int
    level: float

    @property
    def per_minute(self) -> float:
        """The slope in bytes per minute."""
        return self.slope * 60

    @property
    def rank(self) -> int:
        """Worst first: leaking 3, growing 2, steady 1, warming up 0."""
        return VERDICTS.index(self.verdict)


def _thin(points: Sequence[tuple[float, float]]) -> Sequence[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    step = (len(points) - 1) / (MAX_POINTS - 1)
    return [points[round(i * step)] for i in range(MAX_POINTS)]


def format_per_minute(bytes_per_s: float) -> str:
    """A growth rate as people read it: ``+75.0 MiB/min``, ``-1.2 KiB/min``."""
    if abs(bytes_per_s * 60) < 1:
        return "+0 B/min"
    sign = "+" if bytes_per_s >= 0 else "-"
    return f"{sign}{format_bytes(abs(bytes_per_s) * 60)}/min"


def theil_sen(points: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """``(slope, low, high)``: the median pairwise slope of ``(t, value)`` points and
    its 95% confidence interval (Sen's rank method).

    Points with equal times are not paired.  With fewer than two distinct times the
    slope is 0 and the interval unbounded.
    """
    pts = _thin(points)
    slopes = sorted((v2 - v1) / (t2 - t1)
                    for i, (t1, v1) in enumerate(pts)
                    for t2, v2 in pts[i + 1:] if t2 != t1)
    count = len(slopes)
    if not count:
        return 0.0, -math.inf, math.inf
    n = len(pts)
    spread = _Z * math.sqrt(n * (n - 1) * (2 * n + 5) / 18)
    lo_rank = math.floor((count - spread) / 2)
    hi_rank = math.ceil((count + spread) / 2)
    low = slopes[lo_rank] if lo_rank >= 0 else -math.inf
    high = slopes[hi_rank] if hi_rank < count else math.inf
    return statistics.median(slopes), low, high


def bytes_per_explaining_byte(points: Sequence[tuple[float, float]],
                              explained_by: Sequence[tuple[float, float]]) -> float:
    """How many bytes of ``points`` each byte of ``explained_by`` brings (the median of
    the pairwise ratios of their changes, within 0 and `MAX_EXPLAINED_RATIO`): a server
    whose RSS grows 1.1 bytes per byte of payload has a ratio of 1.1."""
    pairs = _thin([(e, v) for (_, v), (_, e) in zip(points, explained_by, strict=True)])
    ratios = [(v2 - v1) / (e2 - e1)
              for i, (e1, v1) in enumerate(pairs)
              for e2, v2 in pairs[i + 1:] if abs(e2 - e1) >= MIN_EXPLAINING_CHANGE]
    if not ratios:
        return 0.0
    return min(max(statistics.median(ratios), 0.0), MAX_EXPLAINED_RATIO)


def analyze(points: Sequence[tuple[float, float]], *,
            explained_by: Sequence[tuple[float, float]] | None = None) -> Growth:
    """The growth verdict of a window of ``(t, value)`` samples (oldest first).

    Parameters:
        points: the series, e.g. a process's RSS in bytes against time in seconds.
        explained_by: a series whose growth accounts for growth in ``points`` (the
            server's payload), sample by sample (matched by position: both come from the
            same samples); ``points`` minus its share (`bytes_per_explaining_byte` times
            it) is what is judged.
    """
    level = statistics.median(v for _, v in points) if points else 0.0
    explained = 0.0
    if explained_by is not None and len(explained_by) == len(points) and len(points) >= 2:
        ratio = bytes_per_explaining_byte(points, explained_by)
        explained = ratio * theil_sen(explained_by)[0]
        points = [(t, v - ratio * e) for (t, v), (_, e) in
                  zip(points, explained_by, strict=True)]
    span = points[-1][0] - points[0][0] if points else 0.0
    floor = max(FLOOR_BYTES_PER_MIN, FLOOR_SHARE_PER_MIN * max(level, 0.0)) / 60
    if len(points) < MIN_SAMPLES or span < MIN_SPAN:
        return Growth("warming up", 0.0, -math.inf, math.inf, floor, 0.0, explained, span,
                      len(points), level)
    slope, low, high = theil_sen(points)
    half = points[len(points) // 2:]
    recent, recent_low, _ = theil_sen(half)
    least = max(LEAK_MIN_BYTES, LEAK_MIN_SHARE * max(level, 0.0))
    if low <= floor:
        verdict = "steady"
    elif recent_low > floor and slope * span >= least:
        verdict = "leaking"
    else:
        verdict = "growing"
    return Growth(verdict, slope, low, high, floor, recent, explained, span, len(points),
                  level)
