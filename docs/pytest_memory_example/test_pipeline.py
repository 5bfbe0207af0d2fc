"""The planted leak as tests, for README's "Memory per test": twelve steps of a pipeline
make and drop an 8 MiB state each; test_step_leaky keeps every state it makes in a
module-level list (a cache nobody clears).  Run: python -m pytest -n 2 --shmstore-memory
docs/pytest_memory_example"""
import pytest

MIB = 1024 * 1024
CACHE = []


def make_state(i):
    return bytes([i % 256]) * (8 * MIB)  # 8 MiB of touched pages


@pytest.mark.parametrize("i", range(12))
def test_step(i):
    state = make_state(i)
    assert state[0] == i % 256


@pytest.mark.parametrize("i", range(4))
def test_step_leaky(i):
    state = make_state(i)
    CACHE.append(state)  # the leak
    assert len(CACHE) >= 1
