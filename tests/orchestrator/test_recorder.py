"""The run's record on a real Redis: every stream to JSONL once, and a full disk loses nothing."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.recorder import GROUP, Recorder, RunDirError
from sentinel.orchestrator.streams import CARRIES, Stream
from tests.factories import examples

pytestmark = pytest.mark.anyio


def stream_of(message: object) -> Stream:
    return next(s for s, model in CARRIES.items() if isinstance(message, model))


async def test_every_stream_is_written_once_per_key(bus: Bus, tmp_path: Path) -> None:
    messages = [m for m in examples() if any(isinstance(m, c) for c in CARRIES.values())]
    for message in messages:
        await bus.publish(stream_of(message), message)
    await bus.publish(stream_of(messages[0]), messages[0])  # a duplicate: recorded once
    recorder, stop = Recorder(bus, tmp_path), anyio.Event()
    directory = tmp_path / "artifacts"
    async with anyio.create_task_group() as tg:
        tg.start_soon(recorder.run, stop)
        with anyio.fail_after(20):
            while len(list(directory.glob("*.jsonl"))) < len(messages) - 1:  # two are tasks
                await anyio.sleep(0.1)
            await anyio.sleep(0.5)
        stop.set()
    for message in messages:
        lines = (directory / f"{stream_of(message).value}.jsonl").read_text().splitlines()
        assert message.model_dump_json() in lines
    tasks = (directory / "tasks.jsonl").read_text().splitlines()
    assert len(tasks) == 1  # task() published twice under one key


async def test_a_full_disk_stops_with_a_clear_error_and_leaves_messages_pending(
    bus: Bus, tmp_path: Path
) -> None:
    directory = tmp_path / "artifacts"
    directory.mkdir()
    (directory / "tasks.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    message = examples()[0]
    await bus.publish(Stream.TASKS, message)
    with anyio.fail_after(20), pytest.raises(RunDirError, match="is full"):
        await Recorder(bus, tmp_path).run()
    pending = await bus.redis.xpending(bus.keys.stream(Stream.TASKS), GROUP)
    assert pending["pending"] == 1
