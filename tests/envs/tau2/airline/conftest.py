"""Fixtures of the airline pack's tests: tau2 airline, loaded once per session."""

from __future__ import annotations

import pytest

from sentinel.envs.base import Environment
from sentinel.envs.registry import load, named


@pytest.fixture(scope="session")
def airline() -> Environment:
    """Every episode copies its database, so tests share it."""
    return load(named("airline"))
