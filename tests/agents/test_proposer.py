"""The Proposer on real parts: SmolLM2 writes grounded tasks for a pattern, the sandboxed
validator judges them, and the verdicts feed the prompt statistics. On tau2's mock domain:
nothing here is retail's, and its prompts and replays are short."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from sentinel.agents.llm import Completion, OpenAIChatClient
from sentinel.agents.prompts import PromptBook, PromptVersion
from sentinel.agents.proposer import (
    ACTION_TOKENS,
    CHARS_PER_TOKEN,
    KEYS_TOKENS,
    MAX_LOOKUPS,
    MAX_WRITES,
    MUTATOR,
    TEXTS,
    Proposer,
    TaskDraft,
    answer_in,
    draft_schema,
    render_prompt,
    restate,
    text_limits,
)
from sentinel.config import ProposerSettings, ValidationSettings
from sentinel.envs.base import Environment
from sentinel.envs.grounding import ground
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import (
    Action,
    Envelope,
    ErrorPattern,
    FailureCategory,
    Origin,
    RejectionCode,
    TaskProposal,
    ValidationResult,
)
from sentinel.schemas.failure import PatternEvidence
from sentinel.usersim.scenario import spoken
from sentinel.validator import Validator

pytestmark = pytest.mark.anyio
SETTINGS = ProposerSettings(tasks_per_pattern=4, mutation_after=3, seed=7, max_tokens=768)
TWO = SETTINGS.model_copy(update={"tasks_per_pattern": 2})  # the LLM's: decoding on CPU is slow
PATTERN = ErrorPattern(
    id="pattern-create",
    title="wrong arguments in create_task",
    description="The agent creates the task for the wrong user or with a title not asked for.",
    category=FailureCategory.WRONG_ARGUMENTS,
    tools=["create_task"],
    example_trajectory_ids=["t-1", "t-2"],
    evidence=[
        PatternEvidence(
            trajectory_id=f"t-{i}",
            summary=f"The agent created the task with the title {title!r}.",
            excerpt=f"user: Add a task '{title}' for me, user_1.\n"
            f'wrong step: assistant calls create_task({{"user_id": "user_2", "title": "{title}"}})',
        )
        for i, title in ((1, "Call mom"), (2, "Pay rent"))
    ],
    frequency={0: 2},
)


@pytest.fixture
async def validator(
    mock: Environment, validator_on: Callable[..., Awaitable[Validator]]
) -> Validator:
    return await validator_on(mock, ValidationSettings())


@pytest.fixture
async def proposer(mock: Environment, bus: Bus) -> AsyncIterator[Callable[..., Proposer]]:
    """Proposers on mock, their mutation pools closed when the test ends."""
    made: list[Proposer] = []

    def make(client: Any, settings: ProposerSettings = SETTINGS) -> Proposer:
        book = PromptBook(bus.redis, bus.settings.prefix, settings)
        made.append(Proposer(mock, book, bus, settings, client))
        return made[-1]

    yield make
    for agent in made:
        await agent.aclose()


async def judge(
    agent: Proposer, validator: Validator, proposals: list[TaskProposal]
) -> list[ValidationResult]:
    results = [await validator.validate(p) for p in proposals]
    for result in results:
        await agent.book.record(result)
    return results


async def test_llm_proposals_are_grounded_and_judged_with_reasons(
    proposer: Callable[..., Proposer],
    validator: Validator,
    llm: Callable[..., OpenAIChatClient],
) -> None:
    agent = proposer(llm(), TWO)
    proposals = await agent.propose(PATTERN)
    assert len(proposals) == TWO.tasks_per_pattern
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
        assert all(r.detail.strip() for r in result.reasons), result.reasons  # each says why
        codes = {r.code for r in result.reasons}  # grounding's enums rule these out
        assert not codes & {RejectionCode.UNKNOWN_TOOL, RejectionCode.UNKNOWN_ENTITY}, codes
    ours = [r for r, p in zip(results, proposals, strict=True) if p.proposer_model == "smol"]
    tally = await agent.book.tally("version:1")  # the LLM's proposals, each counted once
    assert (tally.accepted, tally.rejected) == (
        sum(r.accepted for r in ours),
        sum(not r.accepted for r in ours),
    )
    codes = [r.code.value for result in ours for r in result.reasons]
    assert tally.codes == {code: codes.count(code) for code in codes}


TELL = ErrorPattern(
    id="pattern-tell",
    title="missing communication",
    description="The agent looks the user up but never tells them what they asked for.",
    category=FailureCategory.MISSING_COMMUNICATION,
    tools=["get_users"],
)


async def test_a_communication_pattern_gets_tasks_that_read_and_must_tell(
    proposer: Callable[..., Proposer],
    validator: Validator,
    llm: Callable[..., OpenAIChatClient],
    mock: Environment,
) -> None:
    """No write: the fact to tell is what the gold lookups find, the customer asks for it,
    and the validator accepts the task (saying nothing fails it)."""
    agent = proposer(llm(), SETTINGS.model_copy(update={"tasks_per_pattern": 1}))
    [proposal] = await agent.propose(TELL)
    assert proposal.proposer_model == "smol", "SmolLM2 wrote no parseable task"
    task = proposal.task
    assert not {a.name for a in task.actions} & mock.write_tools
    [fact] = task.spec.evaluation_criteria.communicate_info  # type: ignore[misc, union-attr]
    assert fact in json.dumps(mock.database)  # what the lookups read
    assert 'You call to ask: "What is the ' in task.spec.user_scenario.instructions.reason_for_call  # type: ignore[union-attr]
    assert task.provenance.target_category == FailureCategory.MISSING_COMMUNICATION
    result = await validator.validate(proposal)
    assert result.accepted, result.reasons


async def test_a_question_task_whose_lookups_find_nothing_is_malformed(
    proposer: Callable[..., Proposer], mock: Environment
) -> None:
    from sentinel.agents.llm import MalformedOutput
    from tests.factories import todo

    task = todo(mock, "nothing-to-tell")
    writes_only = task.model_copy(update={"spec": task.spec.model_copy(update={
        "evaluation_criteria": task.spec.evaluation_criteria.model_copy(  # type: ignore[union-attr]
            update={"actions": task.actions[1:]}
        )
    })})  # fmt: skip
    with pytest.raises(MalformedOutput, match="nothing to tell"):
        await proposer(None)._telling(writes_only)  # a write is never stepped here


@pytest.mark.parametrize(
    ("results", "found"),
    [
        (['{"user_1": {"user_id": "user_1", "name": "Test User"}}'], ("name", "Test User")),
        (['{"a": {"price": 12.5}}', '{"order_id": "#W1", "status": "pending"}'],
         ("status", "pending")),  # the last lookup first; never an id
        (['{"name": "Ann Lee"}'], None),  # the customer knows it already
        (["not json", '{"flag": true, "n": 1}'], None),  # a bool; a value too short to check
        ([], None),
    ],
)  # fmt: skip
def test_the_fact_to_tell_is_a_looked_up_value_the_customer_lacks(
    results: list[str], found: tuple[str, str] | None
) -> None:
    assert answer_in(results, known="I am Ann Lee.") == found


def test_the_prompt_shows_the_newest_failures_and_the_turns_where_they_went_wrong(
    mock: Environment,
) -> None:
    grounding = ground(mock, ["create_task"], random.Random(0))
    prompt = render_prompt(PATTERN, grounding, PromptVersion(version=1))
    newest, older = (prompt.index(f"'{title}' for me") for title in ("Pay rent", "Call mom"))
    assert prompt.index("Failures seen, newest first:") < newest < older
    assert '  wrong step: assistant calls create_task({"user_id": "user_2"' in prompt
    assert prompt.index("Failures seen") < prompt.index("Entities (use only these ids):")
    assert "Failures seen" not in render_prompt(None, grounding, PromptVersion(version=1))


def test_the_request_is_in_customer_words_with_values_but_no_tool_or_argument_syntax(
    mock: Environment,
) -> None:
    writes = [
        Action(action_id="0", name="update_task_status",
               arguments={"task_id": "task_1", "status": "completed"}),
        Action(action_id="1", name="create_task",
               arguments={"user_id": "user_1", "title": "Plan", "notes": "x" * 200}),
    ]  # fmt: skip
    said = restate(writes, "It is done.", mock.pack.phrasing)
    assert said == (
        "You call to say: \"I'd like to change the status of one of my tasks and add a new "
        'task to my to-do list." The details you have: task_1; completed; user_1; Plan. '
        "It is done."
    )
    assert spoken({"ids": ["a", 2, None], "flag": True, "nested": {"k": "v"}}) == ["a", "2", "v"]


def test_draft_texts_shrink_so_that_a_draft_closes_within_its_budget() -> None:
    """SmolLM2 writes each text up to its maxLength: with the most actions, a draft still
    closes within max_tokens, and every text the schema allows parses as a TaskDraft."""
    actions = KEYS_TOKENS + ACTION_TOKENS * (MAX_LOOKUPS + MAX_WRITES)
    for max_tokens in (512, 640, 768, 1024):
        properties = draft_schema({}, {}, max_tokens)["properties"]
        texts = {k: v["maxLength"] for k, v in properties.items() if k not in ("lookups", "writes")}
        assert set(texts) == set(TaskDraft.model_fields) - {"lookups", "writes"}
        assert actions + sum(texts.values()) / CHARS_PER_TOKEN <= max_tokens
        for name, limit in texts.items():
            assert limit <= TaskDraft.model_fields[name].metadata[0].max_length
    assert text_limits(768) == text_limits(4096) == TEXTS  # room for all: the longest texts
    assert text_limits(64) == dict.fromkeys(TEXTS, 16)  # never none


async def test_drafts_in_flight_keep_to_max_concurrency(
    proposer: Callable[..., Proposer], llm: Callable[..., OpenAIChatClient]
) -> None:
    """Two drafts for one pattern, one at a time: the Solver keeps the rest of the server.
    (Unbounded, both requests start before either answers.) Short drafts: only the count
    matters here, and a cut-off draft still costs its request and a repair."""
    settings = TWO.model_copy(update={"max_concurrency": 1, "max_tokens": 64})
    client = InFlight(llm())
    proposals = await proposer(client, settings).propose(PATTERN)
    assert len(proposals) == settings.tasks_per_pattern  # written, or mutated instead
    assert client.calls >= 2
    assert client.most == 1


async def test_repeated_rejections_switch_the_pattern_to_mutation(
    proposer: Callable[..., Proposer], bus: Bus, validator: Validator
) -> None:
    agent = proposer(Garbage())
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


async def test_without_an_llm_it_mutates_seeds(proposer: Callable[..., Proposer]) -> None:
    agent = proposer(None)
    proposals = await agent.propose(PATTERN)
    assert len(proposals) == SETTINGS.tasks_per_pattern
    assert {(p.proposer_model, p.task.provenance.origin) for p in proposals} == {
        (MUTATOR, Origin.MUTATED)
    }
    # each draws anew (mock's one create_task seed has eight new titles, so two may meet)
    assert len({p.task.id for p in proposals}) > 1


@pytest.mark.parametrize(("weight", "tasks"), [(2.0, 8), (0.5, 2), (0.1, 1), (0.0, 0)])
async def test_a_patterns_steering_weight_scales_its_tasks(
    proposer: Callable[..., Proposer], weight: float, tasks: int
) -> None:
    agent = proposer(None)  # mutation only: fast, and the count is all this checks
    proposals = await agent.propose(PATTERN.model_copy(update={"weight": weight}))
    assert len(proposals) == tasks


async def test_a_structurally_wrong_draft_is_a_schema_verdict_not_a_crash(
    proposer: Callable[..., Proposer], bus: Bus
) -> None:
    """Issue 19, 4: a draft whose action name is not a string, or whose arguments are not an
    object, used to raise from handle_pattern (redelivered until dead-lettered, unlearnt)."""
    client = Shaped(
        {"name": 5, "arguments": {"user_id": "user_1"}},
        {"name": "create_task", "arguments": ["user_1", "Plan the sprint"]},
    )
    agent = proposer(client)
    await agent.handle_pattern(Envelope.wrap(PATTERN))
    published = await bus.redis.xlen(bus.keys.stream(Stream.PROPOSALS))
    assert published == SETTINGS.tasks_per_pattern  # mutations stood in for the drafts
    entries = await bus.redis.xrange(bus.keys.stream(Stream.VALIDATIONS))
    verdicts = [Envelope.from_wire(fields, ValidationResult).payload for _, fields in entries]
    assert len(verdicts) == SETTINGS.tasks_per_pattern
    for verdict in verdicts:
        assert not verdict.accepted
        [reason] = verdict.reasons
        assert reason.code == RejectionCode.SCHEMA
        assert reason.detail.startswith("TaskDraft: writes.0."), reason.detail
    await consume_verdicts(agent, bus)
    tally = await agent.book.tally(f"pattern:{PATTERN.id}")
    assert tally.codes == {"schema": SETTINGS.tasks_per_pattern}  # the prompt book learnt


async def consume_verdicts(agent: Proposer, bus: Bus) -> None:
    consumer = bus.consumer(
        Stream.VALIDATIONS, "proposer-feedback", ValidationResult, agent.handle_verdict
    )
    while await consumer.poll():
        pass


class InFlight:
    """The real client, counting its requests in flight."""

    def __init__(self, client: OpenAIChatClient) -> None:
        self.client, self.model = client, client.model
        self.now = self.most = self.calls = 0

    async def complete(self, *args: Any, **kwargs: Any) -> Completion:
        self.now, self.calls = self.now + 1, self.calls + 1
        self.most = max(self.most, self.now)
        try:
            return await self.client.complete(*args, **kwargs)
        finally:
            self.now -= 1


class Garbage:
    """A stand-in endpoint whose JSON never parses (error handling only)."""

    model = "garbage"
    calls = 0

    async def complete(self, *_: Any, **__: Any) -> Completion:
        Garbage.calls += 1
        return Completion(content='{"persona": "cut off', finish_reason="length")


class Shaped:
    """A stand-in endpoint whose drafts are well-formed JSON of the wrong shape: each answer
    (the first try, then the repair) has one of `writes` as its only write."""

    model = "shaped"

    def __init__(self, *writes: dict[str, Any]) -> None:
        self.writes = writes
        self.calls = 0

    async def complete(self, *_: Any, **__: Any) -> Completion:
        write = self.writes[self.calls % len(self.writes)]
        self.calls += 1
        draft = {
            "lookups": [], "writes": [write], "reason_for_call": "Add it.",
            "known_info": "", "unknown_info": "", "task_instructions": "", "persona": "Calm.",
        }  # fmt: skip
        return Completion(content=json.dumps(draft), finish_reason="stop")
