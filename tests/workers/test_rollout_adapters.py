"""A rollout finishes on the policy it started with: newer policies arriving at the rollout
worker mid-group neither close its runner nor change the served name or the cache salt of any
of its turns (the real vLLM server, Redis, and tau2's mock domain)."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

from sentinel.agents.llm import OpenAIChatClient
from sentinel.config import LLMEndpoint, Settings
from sentinel.envs.registry import load, named
from sentinel.schemas import RolloutGroup, RolloutRequest, TerminationReason
from sentinel.training.publisher import cache_salt
from sentinel.workers.rollout import KEPT_RUNNERS, RolloutService

pytestmark = pytest.mark.anyio


@pytest.fixture
def worker_settings(settings: Settings, policy_url: str) -> Settings:
    endpoint = LLMEndpoint(base_url=policy_url, max_retries=0)
    return settings.model_copy(
        update={
            "env": named("mock"),
            "llm": settings.llm.model_copy(update={"policy": endpoint, "user_sim": endpoint}),
            "rollout": settings.rollout.model_copy(
                update={"max_agent_turns": 2, "max_tokens": 32, "user_max_tokens": 24}
            ),
            "leafe": settings.leafe.model_copy(update={"use_llm": False}),
        }
    )


def record_requests(
    client: OpenAIChatClient, seen: list[dict[str, object]], first: anyio.Event
) -> None:
    """The client's sampling requests as vLLM receives them (model, cache_salt, ...)."""

    async def hook(request: httpx.Request) -> None:
        if request.url.path.endswith("completions"):
            seen.append(json.loads(request.content))
            first.set()

    client._client = client._client.with_options(  # observing the real requests, not faking
        http_client=httpx.AsyncClient(event_hooks={"request": [hook]})
    )


async def test_newer_policies_mid_group_leave_every_turn_on_the_starting_one(
    worker_settings: Settings, redis_url: str
) -> None:
    service = RolloutService(worker_settings, redis_url)
    await service.start()
    try:
        task = load(named("mock")).tasks("train")[0]
        request = RolloutRequest(task=task, size=1, policy_version=0, served_name="smol")
        seen: list[dict[str, object]] = []
        first = anyio.Event()
        async with service.runner(request) as runner:  # the runner the group will use
            assert isinstance(runner.solver.client, OpenAIChatClient)
            record_requests(runner.solver.client, seen, first)
        groups: list[RolloutGroup] = []

        async def roll_out() -> None:
            groups.append(await service._roll_out(request))

        async with anyio.create_task_group() as tg:
            tg.start_soon(roll_out)
            with anyio.fail_after(120):
                await first.wait()
            for version in range(1, KEPT_RUNNERS + 3):  # newer policies' groups arrive
                newer = request.model_copy(update={"policy_version": version, "id": f"v{version}"})
                async with service.runner(newer):
                    pass
            assert service.runners.get(("smol", 0)) is runner  # in use: never closed
    finally:
        await service.stop()
    [group] = groups
    assert all(t.termination != TerminationReason.INFRA_ERROR for t in group.trajectories)
    assert {t.policy_model for t in group.trajectories} == {"smol"}
    assert len(seen) > len(group.trajectories), seen  # more than one turn each, on average
    assert {(body["model"], body.get("cache_salt")) for body in seen} == {("smol", cache_salt(0))}
