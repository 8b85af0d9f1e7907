"""Shared fixtures: one real redis-server for the session, a fresh key prefix per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before anything imports litellm

from sentinel.config import BusSettings, Settings
from sentinel.orchestrator.bus import Bus, connect
from sentinel.orchestrator.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """$SENTINEL_TEST_REDIS_URL if set, else the embedded redis-server (never a fake)."""
    if url := os.environ.get("SENTINEL_TEST_REDIS_URL"):
        yield url
        return
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def bus_settings() -> BusSettings:
    """Fast timings so that reclaim and dead-lettering happen within a test."""
    return BusSettings(
        prefix=f"test-{uuid.uuid4().hex[:8]}",
        block_ms=100,
        claim_idle_ms=600,
        max_deliveries=3,
        batch_size=32,
    )


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, bus_settings: BusSettings) -> Settings:
    return Settings(run_dir=tmp_path / "run", redis_url=redis_url, bus=bus_settings)


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    bus = Bus(connect(settings.redis_url or "", settings), settings.bus)
    yield bus
    await bus.aclose()
