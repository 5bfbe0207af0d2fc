"""The growth verdict on synthetic series (`shmstore.monitor.growth`)."""

from __future__ import annotations

import math
import random

import pytest

from shmstore.monitor.growth import (
    FLOOR_BYTES_PER_MIN,
    MIN_SAMPLES,
    analyze,
    bytes_per_explaining_byte,
    theil_sen,
)

MIB = 1024 * 1024
STEP = 0.5  # seconds between samples, the server's default


def series(f, seconds: float = 30.0, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    n = int(seconds / STEP)
    return [(i * STEP, f(i * STEP, rng)) for i in range(n)]


def test_theil_sen_finds_a_line_and_ignores_outliers() -> None:
    line = [(float(t), 5.0 + 3.0 * t) for t in range(50)]
    slope, low, high = theil_sen(line)
    assert slope == pytest.approx(3.0)
    assert low <= 3.0 <= high
    # 20% of the points thrown far off (a GC drop, an allocator step): least squares
    # would follow them, the median of pairwise slopes does not.
    rng = random.Random(1)
    spoiled = [(t, v + (rng.choice([-1, 1]) * 1e6 if rng.random() < 0.2 else 0.0))
               for t, v in line]
    assert theil_sen(spoiled)[0] == pytest.approx(3.0, rel=0.05)


def test_theil_sen_of_too_few_points_is_flat_and_unbounded() -> None:
    assert theil_sen([(0.0, 1.0)]) == (0.0, -math.inf, math.inf)
    assert theil_sen([(1.0, 1.0), (1.0, 9.0)]) == (0.0, -math.inf, math.inf)


def test_a_flat_noisy_process_is_steady() -> None:
    g = analyze(series(lambda t, r: 200 * MIB + r.gauss(0, 2 * MIB)))
    assert g.verdict == "steady"
    assert g.low <= g.floor


def test_a_process_that_keeps_every_state_is_leaking() -> None:
    # 64 KiB kept 20 times a second: 1.25 MiB/s, in noise of 2 MiB.
    g = analyze(series(lambda t, r: 150 * MIB + 1.25 * MIB * t + r.gauss(0, 2 * MIB)))
    assert g.verdict == "leaking"
    assert g.per_minute == pytest.approx(75 * MIB, rel=0.15)
    assert g.low > g.floor and g.recent > g.floor


def test_growth_that_stops_is_growing_not_leaking() -> None:
    # A cache that fills for 12 s and then holds: grew, but not in the recent half.
    g = analyze(series(lambda t, r: 100 * MIB + 4 * MIB * min(t, 12.0) + r.gauss(0, MIB)))
    assert g.verdict == "growing"


def test_sustained_growth_short_of_a_leaks_least_is_growing() -> None:
    # 10 MiB/min for 30 s: significant and still going, but 5 MiB in all, what buffers
    # that follow a growing state do; a leak has grown by 16 MiB (or 5%) in the window.
    g = analyze(series(lambda t, r: 25 * MIB + 10 * MIB / 60 * t + r.gauss(0, 0.2 * MIB)))
    assert g.verdict == "growing"
    assert g.low > g.floor and g.recent > g.floor
    longer = analyze(series(lambda t, r: 25 * MIB + 10 * MIB / 60 * t, seconds=120))
    assert longer.verdict == "leaking"  # 20 MiB over two minutes: the same rate, named


def test_slow_growth_under_the_noise_floor_is_steady() -> None:
    # Half the absolute floor: real, but too slow to call (and to matter in 30 s).
    rate = FLOOR_BYTES_PER_MIN / 2 / 60
    g = analyze(series(lambda t, r: 50 * MIB + rate * t))
    assert g.verdict == "steady"


def test_too_few_samples_are_warming_up() -> None:
    short = series(lambda t, r: 10 * MIB * t)[:MIN_SAMPLES - 1]
    assert analyze(short).verdict == "warming up"
    assert analyze([]).verdict == "warming up"


def test_server_growth_explained_by_its_payload_is_steady() -> None:
    # Writers with growing states: payload climbs, RSS follows at 1.12 bytes per byte.
    payload = series(lambda t, r: 2 * MIB * t)
    rss = [(t, 80 * MIB + 1.12 * p + random.Random(int(t * 10)).gauss(0, MIB))
           for t, p in payload]
    assert analyze(rss).verdict == "leaking"  # judged alone, it climbs
    g = analyze(rss, explained_by=payload)
    assert g.verdict == "steady"
    assert bytes_per_explaining_byte(rss, payload) == pytest.approx(1.12, rel=0.05)
    assert g.explained == pytest.approx(1.12 * 2 * MIB, rel=0.05)


def test_server_growth_beyond_its_payload_is_still_leaking() -> None:
    # Payload flat, RSS climbing: nothing the store keeps explains it.
    payload = series(lambda t, r: 40 * MIB)
    rss = series(lambda t, r: 90 * MIB + 3 * MIB * t + r.gauss(0, MIB))
    assert analyze(rss, explained_by=payload).verdict == "leaking"


def test_a_steady_process_is_not_flagged_over_many_seeds() -> None:
    flagged = [seed for seed in range(200)
               if analyze(series(lambda t, r: 300 * MIB + r.gauss(0, 4 * MIB), seed=seed)
                          ).verdict != "steady"]
    assert len(flagged) <= 4  # a 95% interval, and a floor above it: ~never
