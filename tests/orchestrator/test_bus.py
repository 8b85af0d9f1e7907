from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import pytest
import structlog
import structlog.testing

from sentinel.config import BusSettings, Settings
from sentinel.orchestrator.bus import Bus, Reject, connect
from sentinel.orchestrator.monitor import run_monitor
from sentinel.orchestrator.recorder import Recorder as RunRecorder
from sentinel.orchestrator.redis_server import RedisServer
from sentinel.orchestrator.streams import GROUPS, ORCHESTRATOR, RECORDER, TRAINER, Stream
from sentinel.schemas import Envelope, RolloutGroup, Task
from sentinel.schemas.envelope import peek_key
from tests import factories

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    """The bus with no declared groups: these tests read `tasks` with groups of their own.

    Tests of the declared groups build `Bus(bus.redis, bus.settings)`, as every process does.
    """
    bus = Bus(connect(settings.redis_url or "", settings), settings.bus, groups={})
    yield bus
    await bus.aclose()


class Recorder:
    """A handler that counts what it handled, optionally failing or stalling."""

    def __init__(self, fail: Callable[[Envelope[Task]], Exception | None] = lambda e: None) -> None:
        self.handled: Counter[str] = Counter()
        self.attempts: dict[str, int] = {}
        self.fail = fail

    async def __call__(self, envelope: Envelope[Task]) -> None:
        if (error := self.fail(envelope)) is not None:
            raise error
        self.handled[envelope.key] += 1
        self.attempts[envelope.key] = envelope.attempt


async def consume_until(
    bus: Bus, handler: Recorder, done: Callable[[], Awaitable[bool]], *, name: str = "c1",
    group: str = "g", timeout: float = 10.0,
) -> None:  # fmt: skip
    stop = anyio.Event()
    with anyio.fail_after(timeout):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: bus.consume("tasks", group, name, Task, handler, stop=stop))
            while not await done():
                await anyio.sleep(0.05)
            stop.set()


async def test_publish_and_consume_typed_messages(bus: Bus) -> None:
    tasks = [factories.task(i) for i in range(5)]
    await bus.publish_many("tasks", tasks)
    recorder = Recorder()

    async def all_handled() -> bool:
        return len(recorder.handled) == 5

    await consume_until(bus, recorder, all_handled)
    assert recorder.handled == Counter({t.id: 1 for t in tasks})
    info = (await bus.redis.xinfo_groups(bus.keys.stream("tasks")))[0]
    assert info["pending"] == 0
    stats = await bus.redis.hgetall(bus.keys.stats("tasks"))
    assert (stats["published"], stats["g:read"], stats["g:acked"]) == ("5", "5", "5")


async def test_killed_consumer_work_is_reclaimed_and_handled_exactly_once(
    bus: Bus, settings: Settings
) -> None:
    tasks = [factories.task(i) for i in range(4)]
    await bus.ensure_group("tasks", "g")
    await bus.publish_many("tasks", tasks)
    doomed = subprocess.Popen(
        [sys.executable, "-m", "tests.orchestrator.hanging_consumer", settings.redis_url or "",
         bus.settings.prefix, "tasks", "g"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        with anyio.fail_after(30):
            while await bus.redis.llen(f"{bus.settings.prefix}:started") < 4:
                assert doomed.poll() is None, "the consumer died before it took the messages"
                await anyio.sleep(0.05)
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
    recorder = Recorder()

    async def all_handled() -> bool:
        return len(recorder.handled) == 4

    await consume_until(bus, recorder, all_handled, name="survivor")
    assert recorder.handled == Counter({t.id: 1 for t in tasks})
    assert set(recorder.attempts.values()) == {2}
    pending = await bus.redis.xpending(bus.keys.stream("tasks"), "g")
    assert pending["pending"] == 0


async def test_poison_messages_are_dead_lettered_and_the_consumer_goes_on(bus: Bus) -> None:
    good = [factories.task(i) for i in range(3)]
    await bus.publish("tasks", good[0])
    bad_wire = Envelope.wrap(factories.task(9)).to_wire()
    bad_wire["envelope"] = bad_wire["envelope"].replace('"domain":"retail"', '"domain":7')
    await bus.redis.xadd(bus.keys.stream("tasks"), bad_wire)  # type: ignore[arg-type]
    await bus.redis.xadd(bus.keys.stream("tasks"), {"junk": "yes"})
    await bus.publish_many("tasks", good[1:])
    recorder = Recorder()

    async def settled() -> bool:
        return len(recorder.handled) == 3 and len(await bus.dead_letters("tasks")) == 2

    await consume_until(bus, recorder, settled)
    letters = await bus.dead_letters("tasks")
    assert "field 'payload.domain'" in letters[0].reason
    assert letters[0].fields == bad_wire  # the original payload, untouched
    assert "field 'envelope': missing" in letters[1].reason
    assert letters[1].fields == {"junk": "yes"}
    assert (await bus.redis.xpending(bus.keys.stream("tasks"), "g"))["pending"] == 0


async def test_reject_dead_letters_at_once_and_failures_after_max_deliveries(bus: Bus) -> None:
    await bus.publish_many("tasks", [factories.task(i) for i in range(3)])

    def fail(envelope: Envelope[Task]) -> Exception | None:
        if envelope.key == "retail-0":
            return Reject("task is not executable")
        if envelope.key == "retail-1":
            return RuntimeError("flaky dependency")
        return None

    recorder = Recorder(fail)

    async def settled() -> bool:
        return len(await bus.dead_letters("tasks")) == 2

    await consume_until(bus, recorder, settled)
    letters = {peek_key(letter.fields): letter for letter in await bus.dead_letters("tasks")}
    assert letters["retail-0"].reason == "rejected: task is not executable"
    assert letters["retail-0"].attempts == 1
    assert letters["retail-1"].reason == "delivered 4 times (max_deliveries 3)"
    assert recorder.handled == Counter({"retail-2": 1})


async def test_duplicate_publishes_are_handled_once(bus: Bus) -> None:
    task = factories.task(0)
    await bus.publish_many("tasks", [task, task])  # two copies in one batch
    recorder = Recorder()

    async def first_done() -> bool:
        return recorder.handled["retail-0"] == 1

    await consume_until(bus, recorder, first_done)
    await bus.publish("tasks", task)  # a later copy, in a later batch
    await bus.publish("tasks", factories.task(1))

    async def second_done() -> bool:
        return recorder.handled["retail-1"] == 1

    await consume_until(bus, recorder, second_done)
    assert recorder.handled == Counter({"retail-0": 1, "retail-1": 1})
    stats = await bus.redis.hgetall(bus.keys.stats("tasks"))
    assert stats["g:duplicates"] == "2"


async def test_concurrent_consumers_share_work_without_double_handling(bus: Bus) -> None:
    tasks = [factories.task(i) for i in range(40)]
    await bus.publish_many("tasks", tasks + tasks[:10])
    recorder = Recorder()

    async def all_handled() -> bool:
        return (
            len(recorder.handled) == 40
            and not (await bus.redis.xpending(bus.keys.stream("tasks"), "g"))["pending"]
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: consume_until(bus, recorder, all_handled, name="a"))
        tg.start_soon(lambda: consume_until(bus, recorder, all_handled, name="b"))
    assert recorder.handled == Counter({t.id: 1 for t in tasks})


async def test_long_handler_keeps_its_lease(bus: Bus) -> None:
    await bus.publish("tasks", factories.task(0))
    started = anyio.Event()
    runs = Counter[str]()

    async def slow(envelope: Envelope[Task]) -> None:
        runs[envelope.key] += 1
        started.set()
        await anyio.sleep(2.5)  # four claim windows of 600 ms

    stop = anyio.Event()
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: bus.consume("tasks", "g", "slow", Task, slow, stop=stop))
            await started.wait()
            tg.start_soon(lambda: bus.consume("tasks", "g", "thief", Task, slow, stop=stop))
            while (await bus.redis.xpending(bus.keys.stream("tasks"), "g"))["pending"]:
                await anyio.sleep(0.1)
            stop.set()
    assert runs == Counter({"retail-0": 1})


async def test_a_starved_lease_is_not_reclaimed_by_its_own_consumer(bus: Bus) -> None:
    """Its renewals starved (a trainer on a loaded CPU), a consumer's sweep finds its own
    running entry idle: it must not start it a second time (once trained a group twice)."""
    await bus.publish("tasks", factories.task(0))
    runs = Counter[str]()

    async def slow(envelope: Envelope[Task]) -> None:
        runs[envelope.key] += 1
        await anyio.sleep(2.5)  # four claim windows of 600 ms, with no renewal

    consumer = bus.consumer("tasks", "g", Task, slow, "starved")

    async def starved() -> None:  # the renewal task never gets to run
        await anyio.sleep_forever()

    consumer._keep_leases = starved  # type: ignore[method-assign]
    stop = anyio.Event()
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer.run, stop)
            while not runs or (await bus.redis.xpending(bus.keys.stream("tasks"), "g"))["pending"]:
                await anyio.sleep(0.1)
            stop.set()
    assert runs == Counter({"retail-0": 1})


async def test_group_deleted_under_a_consumer_is_recreated(bus: Bus) -> None:
    recorder = Recorder()
    await bus.publish("tasks", factories.task(0))

    async def first() -> bool:
        return len(recorder.handled) == 1

    await consume_until(bus, recorder, first)
    await bus.redis.delete(bus.keys.stream("tasks"))  # the stream, its groups and all
    stop = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: bus.consume("tasks", "g", "c1", Task, recorder, stop=stop))
            await anyio.sleep(0.3)  # the consumer now reads a group that does not exist
            await bus.publish("tasks", factories.task(1))
            while len(recorder.handled) < 2:
                await anyio.sleep(0.05)
            stop.set()
    assert recorder.handled == Counter({"retail-0": 1, "retail-1": 1})


async def test_trim_keeps_every_unacknowledged_entry(bus: Bus) -> None:
    await bus.ensure_group("tasks", "fast")
    await bus.ensure_group("tasks", "slow")
    await bus.publish_many("tasks", [factories.task(i) for i in range(10)])
    fast, slow = Recorder(), Recorder()

    async def fast_done() -> bool:
        return len(fast.handled) == 10

    await consume_until(bus, fast, fast_done, group="fast")
    slow_settings = bus.settings.model_copy(update={"batch_size": 4})
    slow_bus = Bus(bus.redis, slow_settings)
    await slow_bus.consumer("tasks", "slow", Task, slow, "s").poll()  # reads and acks 4
    assert await bus.trim("tasks") == 4
    assert await bus.redis.xlen(bus.keys.stream("tasks")) == 6

    async def slow_done() -> bool:
        return len(slow.handled) == 10

    await consume_until(bus, slow, slow_done, group="slow")
    assert slow.handled == Counter({f"retail-{i}": 1 for i in range(10)})


async def test_replayed_dead_letter_is_handled(bus: Bus) -> None:
    await bus.publish("tasks", factories.task(0))
    failing = True
    recorder = Recorder(lambda e: Reject("not yet") if failing else None)

    async def dead() -> bool:
        return len(await bus.dead_letters("tasks")) == 1

    await consume_until(bus, recorder, dead)
    failing = False
    [letter] = await bus.dead_letters("tasks")
    await bus.replay_dead_letter("tasks", letter.entry_id)

    async def handled() -> bool:
        return recorder.handled["retail-0"] == 1

    await consume_until(bus, recorder, handled)
    assert await bus.dead_letters("tasks") == []


async def test_redis_restart_with_aof_loses_no_acknowledged_message(tmp_path: Path) -> None:
    settings = Settings(
        redis_url="redis://unused:1", bus=BusSettings(block_ms=100, claim_idle_ms=600)
    )
    tasks = [factories.task(i) for i in range(20)]
    recorder = Recorder()
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        bus = Bus(connect(server.url, settings), settings.bus)
        await bus.ensure_group("tasks", "g")
        await bus.publish_many("tasks", tasks[:10])

        async def half() -> bool:
            return len(recorder.handled) == 10

        await consume_until(bus, recorder, half)
        await bus.publish_many("tasks", tasks[10:])  # acknowledged by Redis, not yet consumed
        await bus.aclose()
    finally:
        server.stop()  # SIGTERM: Redis fsyncs its AOF
    with RedisServer(tmp_path / "redis") as again:
        bus = Bus(connect(again.url, settings), settings.bus)

        async def all_handled() -> bool:
            return len(recorder.handled) == 20

        await consume_until(bus, recorder, all_handled)
        await bus.aclose()
    assert recorder.handled == Counter({t.id: 1 for t in tasks})


@pytest.mark.anyio
async def test_a_consumer_outlives_a_redis_that_stops_answering(tmp_path: Path) -> None:
    """Redis frozen (SIGSTOP) past the client's socket timeout, as a starved CI machine
    once did: the read times out, the consumer reads again, and loses nothing."""
    settings = Settings(
        redis_url="redis://unused:1", redis_socket_timeout_s=0.5,
        bus=BusSettings(block_ms=100, claim_idle_ms=600),
    )  # fmt: skip
    recorder = Recorder()
    with RedisServer(tmp_path / "redis") as server:
        bus = Bus(connect(server.url, settings), settings.bus)
        await bus.publish("tasks", factories.task(0))
        stop = anyio.Event()
        with anyio.fail_after(30), structlog.testing.capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: bus.consume("tasks", "g", "c1", Task, recorder, stop=stop))
                while len(recorder.handled) < 1:
                    await anyio.sleep(0.05)
                assert server.process is not None
                server.process.send_signal(signal.SIGSTOP)
                await anyio.sleep(2.0)  # four socket timeouts
                server.process.send_signal(signal.SIGCONT)
                await bus.publish("tasks", factories.task(1))
                while len(recorder.handled) < 2:
                    await anyio.sleep(0.05)
                stop.set()
        await bus.aclose()
    assert recorder.handled == Counter({"retail-0": 1, "retail-1": 1})
    assert any(e["event"] == "redis did not answer; reading again" for e in logs)


async def test_a_slow_handler_does_not_hold_back_later_messages(bus: Bus) -> None:
    await bus.publish("tasks", factories.task(0))
    slow_started, release = anyio.Event(), anyio.Event()
    handled: list[str] = []

    async def handler(envelope: Envelope[Task]) -> None:
        if envelope.key == "retail-0":
            slow_started.set()
            await release.wait()
        handled.append(envelope.key)

    stop = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: bus.consume("tasks", "g", "c1", Task, handler, stop=stop))
            await slow_started.wait()
            await bus.publish_many("tasks", [factories.task(1), factories.task(2)])
            while len(handled) < 2:
                await anyio.sleep(0.05)
            pending = await bus.redis.xpending(bus.keys.stream("tasks"), "g")
            assert pending["pending"] == 1  # only the slow one; the others are acknowledged
            release.set()
            stop.set()
    assert sorted(handled[:2]) == ["retail-1", "retail-2"]
    assert handled[2] == "retail-0"


async def test_a_failure_in_a_batch_acknowledges_the_others_but_not_it(bus: Bus) -> None:
    await bus.publish_many("tasks", [factories.task(i) for i in range(5)])
    recorder = Recorder(lambda e: RuntimeError("boom") if e.key == "retail-2" else None)
    consumer = bus.consumer("tasks", "g", Task, recorder, "c1")
    await bus.ensure_group("tasks", "g")
    assert await consumer.poll() == 5  # one batch: settled in one script call
    assert recorder.handled == Counter({f"retail-{i}": 1 for i in (0, 1, 3, 4)})
    pending = await bus.redis.xpending_range(bus.keys.stream("tasks"), "g", "-", "+", 10)
    assert len(pending) == 1
    [entry] = await bus.redis.xrange(bus.keys.stream("tasks"), pending[0]["message_id"], "+", 1)
    assert peek_key(entry[1]) == "retail-2"
    entries = await bus.redis.xrange(bus.keys.stream("tasks"))
    owners = {peek_key(fields): entry_id for entry_id, fields in entries}
    # the failed entry keeps its key too: its retry runs, copies don't
    assert {key: await bus.owner("tasks", "g", key) for key in owners} == owners
    stats = await bus.redis.hgetall(bus.keys.stats("tasks"))
    assert (stats["g:acked"], stats["g:failed"]) == ("4", "1")


async def test_keys_of_any_text_are_owned_by_their_exact_key(bus: Bus) -> None:
    key = 'ключ "q" \\ 😀\n:*'  # batches reach Redis as JSON: escapes must round-trip
    first, _ = await bus.publish_many("tasks", [factories.task(0), factories.task(1)], [key, key])
    recorder = Recorder()
    await bus.ensure_group("tasks", "g")
    assert await bus.consumer("tasks", "g", Task, recorder, "c1").poll() == 2
    assert recorder.handled == Counter({key: 1})
    assert await bus.owner("tasks", "g", key) == first
    await bus.publish("tasks", factories.task(2), key)  # a later copy is a duplicate
    assert await bus.consumer("tasks", "g", Task, recorder, "c1").poll() == 1
    assert recorder.handled == Counter({key: 1})
    assert (await bus.redis.hgetall(bus.keys.stats("tasks")))["g:duplicates"] == "2"


async def test_a_key_is_remembered_one_to_two_dedupe_periods(bus: Bus) -> None:
    short = Bus(bus.redis, bus.settings.model_copy(update={"dedupe_ttl_s": 1}))
    await short.ensure_group("tasks", "g")
    recorder = Recorder()
    consumer = short.consumer("tasks", "g", Task, recorder, "c1")

    async def copy_after(seconds: float) -> None:
        await anyio.sleep(seconds)
        await short.publish("tasks", factories.task(0))
        assert await consumer.poll() == 1

    await copy_after(0)
    [first_hash] = [h for h in short.owner_keys("tasks", "g")
                    if await short.redis.hexists(h, "retail-0")]  # fmt: skip
    start = int(time.time())
    while int(time.time()) == start:  # into the next period: the key is in the last one's hash
        await anyio.sleep(0.05)
    await copy_after(0)
    assert recorder.handled == Counter({"retail-0": 1})
    await copy_after(2.1)  # two periods on, forgotten: a copy runs again
    assert recorder.handled == Counter({"retail-0": 2})
    stats = await short.redis.hgetall(short.keys.stats("tasks"))
    assert stats["g:duplicates"] == "1"
    assert not await short.redis.exists(first_hash)  # expired two periods after its write


async def test_handlers_that_wait_run_concurrently_within_a_batch(bus: Bus) -> None:
    await bus.publish_many("tasks", [factories.task(i) for i in range(6)])
    started, all_started = 0, anyio.Event()

    async def handler(envelope: Envelope[Task]) -> None:
        nonlocal started
        started += 1
        if started == 4:  # concurrency: four at once, or none ever returns
            all_started.set()
        await all_started.wait()

    settings = bus.settings.model_copy(update={"concurrency": 4})
    await bus.ensure_group("tasks", "g")
    with anyio.fail_after(5):
        assert await Bus(bus.redis, settings).consumer("tasks", "g", Task, handler).poll() == 6
    assert started == 6


async def test_a_rejected_foreign_entry_is_dead_lettered_as_valid_json(bus: Bus) -> None:
    wire = Envelope.wrap(factories.task(0)).to_wire()
    odd = json.loads(wire["envelope"]) | {"id": 'from "elsewhere"'}  # any string is an id
    await bus.redis.xadd(bus.keys.stream("tasks"), {"envelope": json.dumps(odd)})
    recorder = Recorder(lambda e: Reject("no"))
    await bus.ensure_group("tasks", "g")
    assert await bus.consumer("tasks", "g", Task, recorder, "c1").poll() == 1
    [letter] = await bus.dead_letters("tasks")
    assert Envelope.from_wire(letter.fields, Task).id == 'from "elsewhere"'


def rollout_groups(n: int) -> list[RolloutGroup]:
    return [factories.group(f"retail-{i}", [1.0, 0.0], i) for i in range(n)]


async def drain(
    bus: Bus, stream: str, group: str, model: type[RolloutGroup], n: int, timeout: float = 5.0
) -> list[str]:
    """Keys `group` handles within `timeout`, or once it has `n`; fewer is the test's to judge."""
    seen: list[str] = []

    async def handle(envelope: Envelope[RolloutGroup]) -> None:
        seen.append(envelope.key)

    stop = anyio.Event()
    with anyio.move_on_after(timeout):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: bus.consume(stream, group, None, model, handle, stop=stop))
            while len(seen) < n:
                await anyio.sleep(0.05)
            stop.set()
    return seen


async def test_trim_keeps_entries_for_a_declared_group_that_does_not_exist_yet(bus: Bus) -> None:
    """Issue 19, 2: the trainer's group is created when its (last to start) pod first reads."""
    declared = Bus(bus.redis, bus.settings)  # streams.GROUPS, as every process opens the bus
    groups = rollout_groups(5)
    await bus.publish_many(Stream.ROLLOUT_GROUPS, groups)  # a publisher that declares nothing
    for early in (RECORDER, ORCHESTRATOR):  # acknowledge everything, without declaring
        assert len(await drain(bus, Stream.ROLLOUT_GROUPS, early, RolloutGroup, 5)) == 5
    assert await declared.trim(Stream.ROLLOUT_GROUPS) == 0
    assert await bus.redis.xlen(bus.keys.stream(Stream.ROLLOUT_GROUPS)) == 5
    late = await drain(declared, Stream.ROLLOUT_GROUPS, TRAINER, RolloutGroup, 5)
    assert sorted(late) == sorted(g.id for g in groups)
    assert await declared.trim(Stream.ROLLOUT_GROUPS) == 5  # now every group has them


async def test_the_trainer_starting_after_the_recorder_acknowledged_everything_gets_every_group(
    bus: Bus, tmp_path: Path
) -> None:
    """Issue 19's done-when, with the real recorder, the monitor's trimming and group names."""
    declared = Bus(bus.redis, bus.settings)
    groups = rollout_groups(6)
    await declared.publish_many(Stream.ROLLOUT_GROUPS, groups)  # as the rollout workers do
    record = tmp_path / "artifacts" / f"{Stream.ROLLOUT_GROUPS.value}.jsonl"
    stop = anyio.Event()
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(RunRecorder(declared, tmp_path).run, stop)
            seen = await drain(declared, Stream.ROLLOUT_GROUPS, ORCHESTRATOR, RolloutGroup, 6)
            while not record.exists() or len(record.read_text().splitlines()) < 6:
                await anyio.sleep(0.05)
            stop.set()
    assert len(seen) == 6
    key = declared.keys.stream(Stream.ROLLOUT_GROUPS)
    for group in (RECORDER, ORCHESTRATOR):
        assert (await declared.redis.xpending(key, group))["pending"] == 0
    with anyio.move_on_after(1.0):  # the monitor trims every stream a few times meanwhile
        await run_monitor(declared, 0.1)
    late = await drain(declared, Stream.ROLLOUT_GROUPS, TRAINER, RolloutGroup, 6)
    assert sorted(late) == sorted(g.id for g in groups)


async def test_the_first_publish_and_a_consumer_start_create_the_declared_groups(bus: Bus) -> None:
    declared = Bus(bus.redis, bus.settings)
    await declared.publish(Stream.TRAJECTORIES, factories.trajectory(0))
    info = await declared.redis.xinfo_groups(declared.keys.stream(Stream.TRAJECTORIES))
    assert sorted(g["name"] for g in info) == sorted(GROUPS[Stream.TRAJECTORIES])
    assert {int(g["pending"]) for g in info} == {0}
    await declared.redis.delete(declared.keys.stream(Stream.POLICY_VERSIONS))
    consumer = declared.consumer(Stream.POLICY_VERSIONS, RECORDER, Task, Recorder())
    stop = anyio.Event()
    stop.set()  # start, create, stop
    await consumer.run(stop)
    info = await declared.redis.xinfo_groups(declared.keys.stream(Stream.POLICY_VERSIONS))
    assert sorted(g["name"] for g in info) == sorted(GROUPS[Stream.POLICY_VERSIONS])


def test_every_consumer_group_of_the_code_is_declared() -> None:
    """A group missing from streams.GROUPS is one trimming may outrun."""
    from sentinel.agents import controller, proposer
    from sentinel.orchestrator import dispatch, loop, recorder
    from sentinel.workers import trainer

    used = {
        (Stream.TRAJECTORIES, controller.GROUP),
        (Stream.PATTERNS, proposer.GROUP),
        (Stream.VALIDATIONS, proposer.FEEDBACK_GROUP),
        (Stream.PROPOSALS, dispatch.GROUP),
        (Stream.ROLLOUT_GROUPS, loop.GROUP),
        (Stream.TRAIN_REPORTS, loop.GROUP),
        (Stream.POLICY_VERSIONS, loop.GROUP),
        (Stream.ROLLOUT_GROUPS, trainer.GROUP),
        *((stream, recorder.GROUP) for stream in Stream),
    }
    assert {(s, g) for s, groups in GROUPS.items() for g in groups} == used


async def test_dead_letters_beyond_dlq_maxlen_are_dropped_counted_and_the_newest_kept(
    bus: Bus,
) -> None:
    capped = Bus(bus.redis, bus.settings.model_copy(update={"dlq_maxlen": 3, "batch_size": 2}))
    poison = [await bus.redis.xadd(bus.keys.stream("tasks"), {"junk": str(i)}) for i in range(5)]
    await capped.ensure_group("tasks", "g")
    with structlog.testing.capture_logs() as logs:  # whatever logging another test configured
        consumer = capped.consumer("tasks", "g", Task, Recorder(), "c1")
        while await consumer.poll():
            pass
    letters = await capped.dead_letters("tasks")
    assert [letter.original_id for letter in letters] == poison[2:]
    assert [letter.fields for letter in letters] == [{"junk": str(i)} for i in (2, 3, 4)]
    assert (await bus.redis.hgetall(bus.keys.stats("tasks")))["dlq_dropped"] == "2"
    assert (await bus.redis.xpending(bus.keys.stream("tasks"), "g"))["pending"] == 0
    dropped = [e for e in logs if e["event"] == "dead letters dropped: dlq_maxlen reached"]
    assert [i for e in dropped for i in e["original_ids"]] == poison[:2]  # the dropped, by id


async def test_a_newer_schema_is_dead_lettered_even_when_its_payload_validates(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Task, "schema_version", 2)  # this consumer reads version 2
    for version in (1, 2, 3):
        envelope = json.loads(Envelope.wrap(factories.task(version)).to_wire()["envelope"])
        envelope["schema_version"] = version  # the same, valid, payload under each version
        await bus.redis.xadd(bus.keys.stream("tasks"), {"envelope": json.dumps(envelope)})
    recorder = Recorder()
    await bus.ensure_group("tasks", "g")
    assert await bus.consumer("tasks", "g", Task, recorder, "c1").poll() == 3
    assert recorder.handled == Counter({"retail-1": 1, "retail-2": 1})  # older and current
    [letter] = await bus.dead_letters("tasks")
    assert peek_key(letter.fields) == "retail-3"
    assert "field 'schema_version': 3 is newer than 2" in letter.reason


async def test_hostile_entries_are_dead_lettered_with_a_reason_and_the_consumer_goes_on(
    bus: Bus,
) -> None:
    wire = Envelope.wrap(factories.task(0)).to_wire()["envelope"]
    hostile = {
        # a lone surrogate in the key: JSON can say it, UTF-8 (and so Redis) cannot
        "surrogate": wire.replace('"retail-0"', '"\\ud800"', 1),
        "nested": '{"key":"k","payload":' + "[" * 100_000 + "]" * 100_000 + "}",
        "huge": wire.replace('"domain":"retail"', f'"domain":["{"x" * 1_000_000}"]'),
    }
    for text in hostile.values():
        await bus.redis.xadd(bus.keys.stream("tasks"), {"envelope": text})
    await bus.publish("tasks", factories.task(1))
    recorder = Recorder()
    await bus.ensure_group("tasks", "g")
    assert await bus.consumer("tasks", "g", Task, recorder, "c1").poll() == 4
    assert recorder.handled == Counter({"retail-1": 1})
    letters = await bus.dead_letters("tasks")
    assert [letter.fields["envelope"] for letter in letters] == list(hostile.values())
    assert all(letter.reason.startswith("invalid Task: field") for letter in letters)
    assert (await bus.redis.xpending(bus.keys.stream("tasks"), "g"))["pending"] == 0
