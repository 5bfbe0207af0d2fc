"""Fixtures of the fault suite; soak tests run only when asked for (``-m soak``)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = config.getoption("markexpr", "") or ""
    if "soak" in markexpr:
        return
    skip = pytest.mark.skip(reason="a soak test: run it with `pytest -m soak tests/faults`")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
