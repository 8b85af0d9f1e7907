"""tau2 telecom, loaded once for this folder's tests."""

from __future__ import annotations

import pytest

from sentinel.envs.base import Environment
from sentinel.envs.registry import load, named


@pytest.fixture(scope="session")
def telecom() -> Environment:
    return load(named("telecom"))
