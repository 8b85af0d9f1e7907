"""From the proposals stream to the Celery `validate` queue.

A proposal is acknowledged on the stream only once Celery's broker has it, so a dispatcher
that dies loses nothing; the Celery task id is the proposal id, and the verdict is keyed by
it, so a proposal dispatched twice is validated harmlessly twice at worst.
"""

from __future__ import annotations

import anyio
from celery import Celery

from sentinel.logs import get_logger
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import Envelope, TaskProposal
from sentinel.workers.app import VALIDATE_QUEUE

log = get_logger(__name__)

GROUP = "validation-dispatch"


class ValidationDispatcher:
    def __init__(self, bus: Bus, app: Celery) -> None:
        self.bus = bus
        self.app = app

    async def handle(self, envelope: Envelope[TaskProposal]) -> None:
        proposal = envelope.payload
        await anyio.to_thread.run_sync(self._send, proposal)
        log.info("proposal dispatched", proposal=proposal.id, queue=VALIDATE_QUEUE)

    def _send(self, proposal: TaskProposal) -> None:
        self.app.send_task(
            "sentinel.validate",
            args=[proposal.model_dump_json()],
            task_id=proposal.id,
            queue=VALIDATE_QUEUE,
        )

    async def run(self, stop: anyio.Event | None = None) -> None:
        await self.bus.consume(Stream.PROPOSALS, GROUP, None, TaskProposal, self.handle, stop=stop)
