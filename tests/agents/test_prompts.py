"""Self-evolving Proposer prompts on a real Redis: tallies, streaks and revisions."""

from __future__ import annotations

import anyio
import pytest

from sentinel.agents.prompts import ORIGIN_TTL_S, Origin, PromptBook
from sentinel.config import ProposerSettings
from sentinel.orchestrator.bus import Bus
from sentinel.schemas import RejectionCode, RejectionReason, ValidationResult

pytestmark = pytest.mark.anyio
SETTINGS = ProposerSettings(revise_after=4, min_acceptance=0.5, max_lessons=2)


def verdict(i: int, code: RejectionCode | None, detail: str = "") -> ValidationResult:
    reasons = [RejectionReason(code=code, detail=detail or code.value)] if code else []
    return ValidationResult(
        proposal_id=f"p-{i}", task_id=f"t-{i}", accepted=code is None, reasons=reasons
    )


@pytest.fixture
def book(bus: Bus) -> PromptBook:
    return PromptBook(bus.redis, bus.settings.prefix, SETTINGS)


async def record(book: PromptBook, i: int, code: RejectionCode | None, detail: str = "") -> None:
    await book.remember(f"p-{i}", Origin(prompt_version=1, pattern_id="pat"))
    await book.record(verdict(i, code, detail))


async def test_low_acceptance_writes_a_new_version_with_lessons(book: PromptBook) -> None:
    assert (await book.current()).name == "v1"
    await record(book, 0, None)
    await record(book, 1, RejectionCode.UNKNOWN_ENTITY, "order #W999 does not exist")
    await record(book, 2, RejectionCode.UNKNOWN_ENTITY, "order #W998 does not exist")
    assert (await book.current()).version == 1  # 3 verdicts: too few to judge
    await record(book, 3, RejectionCode.GOLD_WRITE_FAILED, "cancel: order is delivered")
    current = await book.current()
    assert current.version == 2
    assert current.reason == "v1 accepted 1/4"
    assert len(current.lessons) == 2
    assert "ids listed under Entities" in current.lessons[0]
    assert "#W99" in current.lessons[0]  # a real example of the rejection
    assert "pending" in current.lessons[1]
    tally = await book.tally("version:1")
    assert tally.codes == {"unknown_entity": 2, "gold_write_failed": 1}


async def test_good_acceptance_keeps_the_version(book: PromptBook) -> None:
    for i in range(6):
        await record(book, i, None if i % 3 else RejectionCode.DUPLICATE)
    assert (await book.current()).version == 1


async def test_concurrent_verdicts_revise_once(book: PromptBook) -> None:
    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(record, book, i, RejectionCode.SCHEMA)
    assert [v.version for v in await book.versions()] == [1, 2]


async def test_streak_counts_consecutive_rejections_of_a_pattern(book: PromptBook) -> None:
    await record(book, 0, RejectionCode.SCHEMA)
    await record(book, 1, RejectionCode.SCHEMA)
    assert await book.streak("pat") == 2
    await record(book, 2, None)
    assert await book.streak("pat") == 0


async def test_verdicts_of_unknown_proposals_are_ignored(book: PromptBook) -> None:
    assert await book.record(verdict(99, RejectionCode.SCHEMA)) is None
    assert (await book.tally("version:1")).verdicts == 0


async def test_a_redelivered_verdict_counts_once(book: PromptBook) -> None:
    await book.remember("p-0", Origin(prompt_version=1, pattern_id="pat"))
    rejection = verdict(0, RejectionCode.UNKNOWN_ENTITY, "order #W999 does not exist")
    async with anyio.create_task_group() as tg:  # redeliveries racing the first delivery
        for _ in range(4):
            tg.start_soon(book.record, rejection)
    await book.record(rejection)
    tally = await book.tally("version:1")
    assert (tally.rejected, tally.codes) == (1, {"unknown_entity": 1})
    assert (await book.tally("pattern:pat")).verdicts == 1
    assert await book.streak("pat") == 1
    assert len(await book.redis.lrange(book._key("rejections", 1), 0, -1)) == 1


async def test_an_origin_lasts_until_its_verdict_and_expires_without_one(book: PromptBook) -> None:
    for i in range(2):
        await book.remember(f"p-{i}", Origin(prompt_version=1, pattern_id=None))
    assert 0 < await book.redis.ttl(book._key("origin", "p-1")) <= ORIGIN_TTL_S
    await book.record(verdict(0, None))
    assert not await book.redis.exists(book._key("origin", "p-0"))  # counted: consumed
    assert await book.redis.exists(book._key("origin", "p-1"))  # still awaiting its verdict
