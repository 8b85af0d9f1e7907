from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from typer.testing import CliRunner

from sentinel import jsonl
from sentinel.cli import app
from sentinel.config import Settings
from sentinel.logs import configure_logging
from sentinel.orchestrator.bus import Bus, Reject, connect
from sentinel.orchestrator.monitor import (
    QUEUES_FILE,
    QueueSnapshot,
    _group_figures,
    log_snapshot,
    run_monitor,
    take_snapshot,
    with_rates,
)
from sentinel.orchestrator.streams import GROUPS, Stream
from sentinel.schemas import Envelope, Task
from tests import factories


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    """The bus with no declared groups: the figures below are of group `g` alone."""
    bus = Bus(connect(settings.redis_url or "", settings), settings.bus, groups={})
    yield bus
    await bus.aclose()


async def _fill(bus: Bus) -> None:
    """10 published; group g handles 6, dead-letters 1, leaves 3 unread."""
    await bus.publish_many("tasks", [factories.task(i) for i in range(10)])
    handled = 0

    async def handler(envelope: Envelope[Task]) -> None:
        nonlocal handled
        if envelope.key == "retail-6":
            raise Reject("bad task")
        handled += 1

    consumer = bus.consumer("tasks", "g", Task, handler, "c1")
    await bus.ensure_group("tasks", "g")
    consumer.settings = bus.settings.model_copy(update={"batch_size": 7})
    await consumer.poll()


@pytest.mark.anyio
async def test_snapshot_figures_are_real(bus: Bus) -> None:
    before = await take_snapshot(bus, ["tasks"])
    await _fill(bus)
    snapshot = with_rates(await take_snapshot(bus, ["tasks"]), before)
    [stream] = snapshot.streams
    [group] = stream.groups
    assert (stream.length, stream.published, stream.dead_letters) == (10, 10, 1)
    assert (group.pending, group.lag, group.consumers) == (0, 3, 1)
    assert group.totals["acked"] == 6
    assert group.totals["dead"] == 1
    assert group.rates is not None
    assert group.rates["acked"] > 0


@pytest.mark.anyio
async def test_pending_entries_have_an_age(bus: Bus) -> None:
    await bus.publish("tasks", factories.task(0))
    await bus.ensure_group("tasks", "g")
    await bus.redis.xreadgroup("g", "c", {bus.keys.stream("tasks"): ">"}, count=1)
    await anyio.sleep(0.2)
    [stream] = (await take_snapshot(bus, ["tasks"])).streams
    age = stream.groups[0].oldest_pending_age_s
    assert age is not None
    assert age >= 0.2


@pytest.mark.anyio
async def test_entries_acknowledged_between_two_reads_are_not_an_error(bus: Bus) -> None:
    """XINFO said one was pending; by XPENDING it was acknowledged (a race seen under load)."""
    await bus.publish("tasks", factories.task(0))
    await bus.ensure_group("tasks", "g")
    key = bus.keys.stream("tasks")
    info = {"name": "g", "pending": 1, "consumers": 1}
    figures = await _group_figures(bus, key, info, {})  # nothing pending in fact
    assert figures.oldest_pending_age_s is None
    assert await bus.trim("tasks") == 0


@pytest.mark.anyio
async def test_monitor_lines_are_json_for_jq(bus: Bus, capsys: pytest.CaptureFixture[str]) -> None:
    await _fill(bus)
    configure_logging("INFO", "json", process="monitor")
    capsys.readouterr()
    log_snapshot(await take_snapshot(bus, ["tasks"]))
    [line] = capsys.readouterr().err.strip().splitlines()
    fields = json.loads(line)
    assert fields["event"] == "queue"
    assert fields["process"] == "monitor"
    assert (fields["stream"], fields["group"], fields["lag"], fields["dead_letters"]) == (
        "tasks", "g", 3, 1,
    )  # fmt: skip
    assert fields["level"] == "info"


def test_status_command_shows_real_figures(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fill() -> None:
        bus = Bus(connect(settings.redis_url or "", settings), settings.bus, groups={})
        await _fill(bus)
        await bus.aclose()

    anyio.run(fill)
    monkeypatch.setenv("SENTINEL_REDIS_URL", settings.redis_url or "")
    monkeypatch.setenv("SENTINEL_BUS__PREFIX", settings.bus.prefix)
    runner = CliRunner()
    result = runner.invoke(app, ["status", "--json", "--interval", "0.1"])
    assert result.exit_code == 0, result.output
    snapshot = json.loads(result.stdout.strip().splitlines()[-1])
    tasks = next(s for s in snapshot["streams"] if s["stream"] == "tasks")
    assert tasks["length"] == 10
    assert tasks["groups"][0]["lag"] == 3
    assert tasks["groups"][0]["totals"]["acked"] == 6
    table = runner.invoke(app, ["status", "--interval", "0"], terminal_width=200)
    assert table.exit_code == 0, table.output
    row = next(line for line in table.stdout.splitlines() if "tasks" in line)
    cells = [cell.strip() for cell in row.split("│")[1:9]]
    assert cells == ["tasks", "10", "10", "1", "g", "1", "0", "3"]


@pytest.mark.anyio
async def test_dead_letters_dropped_by_the_cap_are_figures(
    bus: Bus, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(3):
        await bus.redis.xadd(bus.keys.stream("tasks"), {"junk": str(i)})
    capped = Bus(bus.redis, bus.settings.model_copy(update={"dlq_maxlen": 1}), groups={})

    async def never(envelope: Envelope[Task]) -> None:
        raise AssertionError("junk reached the handler")

    await capped.ensure_group("tasks", "g")
    assert await capped.consumer("tasks", "g", Task, never, "c1").poll() == 3
    [stream] = (await take_snapshot(bus, ["tasks"])).streams
    assert (stream.dead_letters, stream.dead_letters_dropped) == (1, 2)
    configure_logging("INFO", "json", process="monitor")
    capsys.readouterr()
    log_snapshot(await take_snapshot(bus, ["tasks"]))
    [line] = capsys.readouterr().err.strip().splitlines()
    assert json.loads(line)["dead_letters_dropped"] == 2


@pytest.mark.anyio
async def test_the_monitor_creates_the_declared_groups_so_their_lag_shows(bus: Bus) -> None:
    """A consumer that has not started yet shows as lag, and holds back trimming."""
    await bus.publish_many(Stream.ROLLOUT_GROUPS, [factories.group("retail-0", [1.0, 0.0])])
    declared = Bus(bus.redis, bus.settings)
    with anyio.move_on_after(0.5):
        await run_monitor(declared, 0.1)
    [stream] = (await take_snapshot(bus, [Stream.ROLLOUT_GROUPS])).streams
    assert {g.group: g.lag for g in stream.groups} == dict.fromkeys(
        GROUPS[Stream.ROLLOUT_GROUPS], 1
    )
    assert stream.length == 1


@pytest.mark.anyio
async def test_the_monitor_records_its_snapshots_for_the_report(bus: Bus, tmp_path: Path) -> None:
    await bus.publish_many(Stream.ROLLOUT_GROUPS, [factories.group("retail-0", [1.0, 0.0])])
    record = tmp_path / QUEUES_FILE
    with anyio.move_on_after(0.5):
        await run_monitor(Bus(bus.redis, bus.settings), 0.1, record=record)
    snapshots = [QueueSnapshot.model_validate_json(x) for x in jsonl.lines(record)]
    assert len(snapshots) >= 2
    lags = {(s.stream, g.group): g.lag for s in snapshots[-1].streams for g in s.groups}
    assert lags[(Stream.ROLLOUT_GROUPS.value, "trainer")] == 1
