"""The Proposer on real parts: SmolLM2 writes grounded tasks for a pattern, the sandboxed
validator judges them, and the verdicts feed the prompt statistics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from sentinel.agents.llm import Completion, OpenAIChatClient
from sentinel.agents.prompts import PromptBook
from sentinel.agents.proposer import MUTATOR, Proposer
from sentinel.config import ProposerSettings, ValidationSettings
from sentinel.envs.sandbox import LocalProcessSandbox, SandboxLimits
from sentinel.envs.tau2 import Tau2Domain
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import (
    ErrorPattern,
    FailureCategory,
    Origin,
    RejectionCode,
    TaskProposal,
    ValidationResult,
)
from sentinel.validator import RedisTaskIndex, Validator

pytestmark = pytest.mark.anyio
SETTINGS = ProposerSettings(tasks_per_pattern=4, mutation_after=3, seed=7, max_tokens=768)
PATTERN = ErrorPattern(
    id="pattern-cancel",
    title="wrong arguments in cancel_pending_order",
    description="The agent cancels the wrong order or gives a reason the user did not state.",
    category=FailureCategory.WRONG_ARGUMENTS,
    tools=["cancel_pending_order"],
    example_trajectory_ids=["t-1", "t-2"],
    frequency={0: 2},
)


@pytest.fixture
async def validator(retail: Tau2Domain, bus: Bus) -> AsyncIterator[Validator]:
    settings = ValidationSettings()
    async with LocalProcessSandbox(SandboxLimits(), warm=1) as sandbox:
        index = RedisTaskIndex(bus.redis, bus.settings.prefix, retail)
        yield Validator(retail, sandbox, settings, index)


def proposer(retail: Tau2Domain, bus: Bus, client: Any) -> Proposer:
    book = PromptBook(bus.redis, bus.settings.prefix, SETTINGS)
    return Proposer(retail, book, bus, SETTINGS, client)


async def judge(
    agent: Proposer, validator: Validator, proposals: list[TaskProposal]
) -> list[ValidationResult]:
    results = [await validator.validate(p) for p in proposals]
    for result in results:
        await agent.book.record(result)
    return results


async def test_llm_proposals_are_grounded_and_judged_with_reasons(
    retail: Tau2Domain, bus: Bus, validator: Validator, llm: Callable[..., OpenAIChatClient]
) -> None:
    agent = proposer(retail, bus, llm())
    proposals = await agent.propose(PATTERN)
    assert len(proposals) == SETTINGS.tasks_per_pattern
    written = [p for p in proposals if p.proposer_model == "smol"]
    assert written, "SmolLM2 wrote no parseable task"
    for p in written:
        assert p.task.provenance.origin == Origin.PROPOSED
        assert p.task.provenance.pattern_id == PATTERN.id
        assert p.task.provenance.parent_trajectory_ids == ["t-1", "t-2"]
        assert p.prompt_version == "v1"
    results = await judge(agent, validator, proposals)
    accepted = sum(r.accepted for r in results)
    print(f"SmolLM2 proposals accepted: {accepted}/{len(results)}")
    for result in results:
        assert result.accepted or result.reasons
        codes = {r.code for r in result.reasons}  # grounding's enums rule these out
        assert not codes & {RejectionCode.UNKNOWN_TOOL, RejectionCode.UNKNOWN_ENTITY}, codes
    tally = await agent.book.tally("version:1")
    assert tally.verdicts == len(written)


async def test_repeated_rejections_switch_the_pattern_to_mutation(
    retail: Tau2Domain, bus: Bus, validator: Validator
) -> None:
    agent = proposer(retail, bus, Garbage())
    first = await agent.propose(PATTERN)  # the LLM fails: unparseable, then mutation
    assert {p.proposer_model for p in first} == {MUTATOR}
    schema_verdicts = await bus.redis.xlen(bus.keys.stream(Stream.VALIDATIONS))
    assert schema_verdicts == SETTINGS.tasks_per_pattern  # each failure taught the prompt
    await consume_verdicts(agent, bus)
    assert await agent.book.streak(PATTERN.id) >= SETTINGS.mutation_after
    calls = Garbage.calls
    second = await agent.propose(PATTERN)
    assert Garbage.calls == calls  # straight to mutation: the LLM was not asked
    results = await judge(agent, validator, second)
    assert sum(r.accepted for r in results) >= len(second) // 2, [r.reasons for r in results]
    for p in second:
        assert p.task.provenance.origin == Origin.MUTATED
        assert p.task.provenance.pattern_id == PATTERN.id


async def test_without_an_llm_it_mutates_seeds(retail: Tau2Domain, bus: Bus) -> None:
    agent = proposer(retail, bus, None)
    proposals = await agent.propose(PATTERN)
    assert len(proposals) == SETTINGS.tasks_per_pattern
    assert len({p.task.id for p in proposals}) == len(proposals)


async def consume_verdicts(agent: Proposer, bus: Bus) -> None:
    consumer = bus.consumer(
        Stream.VALIDATIONS, "proposer-feedback", ValidationResult, agent.handle_verdict
    )
    while await consumer.poll():
        pass


class Garbage:
    """A stand-in endpoint whose JSON never parses (error handling only)."""

    model = "garbage"
    calls = 0

    async def complete(self, *_: Any, **__: Any) -> Completion:
        Garbage.calls += 1
        return Completion(content='{"persona": "cut off', finish_reason="length")
