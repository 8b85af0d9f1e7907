"""The run's durable record: every message of every stream, as JSONL in the run directory.

The recorder is one more consumer group on each stream, so it sees each message once (keys
are deduplicated per group) and the monitor trims nothing it has not written. A message is
acknowledged only after its line is flushed. When the disk is full the recorder stops the
process with a clear error; the unwritten messages stay pending in its group for the restart.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO

import anyio

from sentinel.logs import get_logger
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.streams import CARRIES, Stream
from sentinel.schemas import Envelope, Message

log = get_logger(__name__)

GROUP = "recorder"


class RunDirError(Exception):
    """The run directory cannot take more records (full, read-only, gone)."""


def artifacts_dir(run_dir: Path) -> Path:
    return run_dir / "artifacts"


def _open_for_append(path: Path) -> IO[str]:
    """Open for appending; a line torn by a crash or a full disk is ended first."""
    file = path.open("a+")
    if file.tell() > 0:
        file.seek(file.tell() - 1)
        if file.read(1) != "\n":
            file.write("\n")
    return file


class Recorder:
    def __init__(
        self, bus: Bus, run_dir: Path, observe: Callable[[Message], None] = lambda _: None
    ) -> None:
        self.bus = bus
        self.observe = observe  # each message once written (the tracker: curves)
        self.directory = artifacts_dir(run_dir)
        self.files: dict[Stream, IO[str]] = {}
        self.error: RunDirError | None = None

    def _write(self, stream: Stream, message: Message) -> None:
        try:
            if stream not in self.files:
                self.directory.mkdir(parents=True, exist_ok=True)
                self.files[stream] = _open_for_append(self.directory / f"{stream.value}.jsonl")
            handle = self.files[stream]
            handle.write(message.model_dump_json() + "\n")
            handle.flush()
        except OSError as error:
            if (broken := self.files.pop(stream, None)) is not None:
                with contextlib.suppress(OSError):  # its unflushed line fails again
                    broken.close()
            full = error.errno in {errno.ENOSPC, errno.EDQUOT}
            what = "is full" if full else f"cannot be written ({error.strerror})"
            raise RunDirError(
                f"run directory {self.directory} {what}; free space or move run_dir, then "
                f"restart: the unrecorded messages wait in consumer group {GROUP!r}"
            ) from error

    async def _handle(self, stream: Stream, stop: anyio.Event, envelope: Envelope[Message]) -> None:
        if self.error is not None:
            raise self.error  # left pending: nothing more is acknowledged
        try:
            self._write(stream, envelope.payload)
        except RunDirError as error:
            self.error = error
            stop.set()
            raise
        self.observe(envelope.payload)

    async def run(self, stop: anyio.Event | None = None) -> None:
        """Record every stream until `stop`; raises RunDirError if the disk gives out."""
        stop = stop or anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                for stream, model in CARRIES.items():
                    consumer = self.bus.consumer(
                        stream, GROUP, model, partial(self._handle, stream, stop)
                    )
                    tg.start_soon(consumer.run, stop)
        finally:
            for file in self.files.values():
                file.close()
        if self.error is not None:
            raise self.error
