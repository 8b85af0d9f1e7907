"""The mock pack on real tau2: its splits, gold replays, grounding, mutation, validation."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from sentinel.config import ValidationSettings
from sentinel.envs.base import Environment
from sentinel.envs.episodes import EnvPool
from sentinel.envs.grounding import actions_schema, ground, mutate
from sentinel.envs.pack import GroundingUnsupported
from sentinel.envs.registry import pack
from sentinel.envs.tau2.mock import TEST, UNSCORABLE
from sentinel.envs.tau2.mock.grounding import MockGrounding
from sentinel.schemas import (
    Action,
    ChatMessage,
    EvaluationCriteria,
    Origin,
    Provenance,
    Task,
    TaskSpec,
    TerminationReason,
    ToolCall,
    UserInstructions,
    UserScenario,
)
from sentinel.usersim.scenario import scenario_of
from sentinel.validator import Validator
from tests.envs.test_sandbox import sandbox_pids
from tests.factories import proposal

pytestmark = pytest.mark.anyio
WRITES = ["create_task", "update_task_status"]
UPDATE = {"task_id": "task_1", "status": "completed"}


@pytest.fixture
async def envs() -> AsyncIterator[EnvPool]:
    async with EnvPool("mock", tool_timeout_s=2.0) as pool:
        yield pool
    assert sandbox_pids(pool.id) == []


def _gold_run(env: Environment, task: Task) -> float:
    """tau2's reward for a conversation that makes the gold calls and says what it must."""
    episode = env.episode(task)
    messages: list[ChatMessage] = []
    for a in task.agent_actions:
        call = ToolCall(id=a.action_id, name=a.name, arguments=a.arguments)
        result = episode.step(call)
        messages += [
            ChatMessage(role="assistant", tool_calls=[call]),
            ChatMessage(
                role="tool", tool_call_id=call.id, content=result.content, error=result.error
            ),
        ]
    criteria = task.spec.evaluation_criteria
    said = " ".join((criteria.communicate_info or []) if criteria else []) or "Done."
    messages.append(ChatMessage(role="assistant", content=said))
    return env.reward(task, episode, messages, TerminationReason.AGENT_STOP).reward


def _conversation_free(env: Environment, task: Task) -> float:
    """The reward of a conversation in which the agent does nothing at all."""
    messages = [ChatMessage(role="assistant", content="Goodbye.")]
    return env.reward(task, env.episode(task), messages, TerminationReason.AGENT_STOP).reward


# --- the pack and its splits --------------------------------------------------------------


def test_the_pack_loads_with_its_phrasing_and_grounder(mock: Environment) -> None:
    assert mock.pack is pack("mock")
    assert mock.name == "mock"
    assert mock.write_tools == frozenset(WRITES)
    assert set(mock.pack.phrasing.openings) == mock.write_tools
    assert mock.pack.phrasing.user_id.fullmatch("user_1")
    assert mock.pack.rules == ()  # mock's tools check existence only; the status is typed
    assert len(mock.policy) < 500  # why it is the fast fixture


def test_splits_are_disjoint_and_cover_every_scorable_task(mock: Environment) -> None:
    train = {t.id for t in mock.tasks("train")}
    test = {t.id for t in mock.tasks("test")}
    every = {t.id for t in mock.tasks()}  # the splits' tasks, never the left-out ones
    assert train
    assert test
    assert not train & test
    assert train | test == every
    assert not every & {f"mock-{i}" for i in UNSCORABLE}
    assert test == {f"mock-{i}" for i in TEST}
    assert all(t.provenance.split == "test" for t in mock.tasks("test"))


def test_every_train_task_has_gold_that_scores_1_and_a_no_op_that_scores_0(
    mock: Environment,
) -> None:
    for task in mock.tasks("train"):
        assert [a for a in task.actions if a.name in mock.write_tools], task.id
        assert _gold_run(mock, task) == 1.0, task.id
        assert _conversation_free(mock, task) == 0.0, task.id


def _tau2_tasks(mock: Environment) -> list[Task]:
    """Every task tau2 ships for mock, as ours: `tasks()` only gives the splits' ones."""
    from tau2.domains.mock.environment import get_tasks

    return [
        Task(id=f"mock-{t.id}", domain="mock",
             spec=TaskSpec.model_validate(t.model_dump(mode="json")),
             provenance=Provenance(origin=Origin.SEED, split="train"))
        for t in get_tasks(task_split_name=None)
    ]  # fmt: skip


def test_test_tasks_discriminate_and_the_left_out_ones_cannot(mock: Environment) -> None:
    for task in mock.tasks("test"):
        assert _conversation_free(mock, task) == 0.0, task.id
    left_out = {t.id: t for t in _tau2_tasks(mock) if t.id.removeprefix("mock-") in UNSCORABLE}
    assert _conversation_free(mock, left_out["mock-create_task_1_nl_eval"]) == 1.0
    with pytest.raises(ValueError, match="task_2 not found"):
        _conversation_free(mock, left_out["mock-create_task_1_with_env_assertions"])


def test_a_scenario_names_its_user_and_withholds_the_fallback_kind(mock: Environment) -> None:
    [update] = [t for t in mock.tasks("train") if t.id == "mock-update_task_1"]
    assert scenario_of(update).withheld == "email"  # mock users have none
    [create] = [t for t in mock.tasks("train") if t.id == "mock-create_task_1"]
    assert scenario_of(create).user_id == "user_1"  # found by the pack's pattern
    known = ground(mock, ["create_task"], random.Random(0)).identity()
    assert "user_1" in known
    assert "Test User" in known


# --- grounding and the actions schema -------------------------------------------------------


def test_ground_picks_the_user_and_their_tasks(mock: Environment) -> None:
    g = ground(mock, ["update_task_status", "no_such_tool"], random.Random(0))
    assert isinstance(g, MockGrounding)
    assert g.tools == ["update_task_status"]
    assert (g.user_id, [t.task_id for t in g.tasks]) == ("user_1", ["task_1"])
    assert "user_1" in g.describe()
    assert 'task_1 "Test task" [pending]' in g.describe()
    assert g.identity() == "You are Test User; your user id is user_1."


def test_ground_raises_when_no_user_has_a_task_to_update(mock: Environment) -> None:
    grounder = mock.pack.grounder(mock)
    grounder.users = {"user_9": {"user_id": "user_9", "name": "New", "tasks": []}}  # type: ignore[attr-defined]
    with pytest.raises(GroundingUnsupported, match="no mock user"):
        grounder.ground(["update_task_status"], random.Random(0))
    assert grounder.ground(["create_task"], random.Random(0)).user_id == "user_9"  # type: ignore[attr-defined]


def _schema(mock: Environment, tools: list[str], lookups: bool = True) -> dict[str, Any]:
    g = ground(mock, tools, random.Random(0))
    return actions_schema(mock, g, tools, 4, lookups=lookups)


@pytest.mark.parametrize(
    ("actions", "valid"),
    [
        ([{"name": "create_task", "arguments": {"user_id": "user_1", "title": "Plan"}}], True),
        ([{"name": "get_users", "arguments": {}}], True),
        ([{"name": "create_task", "arguments": {"user_id": "user_2", "title": "Plan"}}], False),
        ([{"name": "create_task", "arguments": {"user_id": "user_1", "title": "x" * 61}}], False),
        ([{"name": "create_task", "arguments": {"user_id": "user_1"}}], False),
        ([{"name": "update_task_status", "arguments": UPDATE}], False),  # not a grounded tool
        ([], False),
    ],
)  # fmt: skip
def test_actions_schema_admits_grounded_ids_and_bounded_text_only(
    mock: Environment, actions: list[dict[str, Any]], valid: bool
) -> None:
    schema = _schema(mock, ["create_task"])
    assert jsonschema.Draft202012Validator(schema).is_valid(actions) == valid


def test_update_schema_offers_the_tools_statuses_and_no_lookups_when_asked(
    mock: Environment,
) -> None:
    schema = _schema(mock, ["update_task_status"], lookups=False)
    [branch] = schema["items"]["anyOf"]
    arguments = branch["properties"]["arguments"]["properties"]
    assert arguments["task_id"]["enum"] == ["task_1"]
    assert arguments["status"]["enum"] == ["pending", "completed"]


@pytest.mark.parametrize(
    "write",
    [
        {"name": "create_task", "arguments": {"user_id": "user_1", "title": "Plan the sprint"}},
        {"name": "update_task_status", "arguments": {"task_id": "task_1", "status": "completed"}},
    ],
)
def test_a_grounded_draft_runs_and_scores_1_with_its_own_gold(
    mock: Environment, write: dict[str, Any]
) -> None:
    schema = _schema(mock, [write["name"]])
    actions = [{"name": "get_users", "arguments": {}}, write]
    assert jsonschema.Draft202012Validator(schema).is_valid(actions)
    task = grounded(mock, [Action(action_id=str(i), **a) for i, a in enumerate(actions)])
    assert _gold_run(mock, task) == 1.0
    assert _conversation_free(mock, task) == 0.0


def grounded(mock: Environment, actions: list[Action], name: str = "grounded") -> Task:
    """A task as the Proposer builds one from a grounded draft."""
    g = ground(mock, [a.name for a in actions], random.Random(0))
    instructions = UserInstructions(
        domain="mock", reason_for_call="You want a task called 'Plan the sprint' created.",
        known_info=g.identity(), task_instructions="Confirm when asked.",
    )  # fmt: skip
    spec = TaskSpec(
        id=name,
        user_scenario=UserScenario(instructions=instructions),
        evaluation_criteria=EvaluationCriteria(actions=actions, communicate_info=[]),
    )
    return Task(id=name, domain="mock", spec=spec, provenance=Provenance(origin=Origin.PROPOSED))


# --- mutation -----------------------------------------------------------------------------


def _seed(mock: Environment, name: str) -> Task:
    return next(t for t in mock.tasks("train") if t.id == f"mock-{name}")


async def test_a_created_task_moves_onto_another_title(mock: Environment, envs: EnvPool) -> None:
    seed = _seed(mock, "create_task_1")
    task = await mutate(seed, mock, random.Random(0), envs=envs)
    assert task is not None
    [write] = task.actions
    assert write.name == "create_task"
    assert write.arguments["user_id"] == "user_1"
    assert write.arguments["title"] not in ("Important Meeting", "Test task")
    assert write.arguments["title"] in task.spec.user_scenario.instructions.reason_for_call  # type: ignore[union-attr]
    assert task.provenance.origin == Origin.MUTATED
    assert task.provenance.generation == 1
    assert _gold_run(mock, task) == 1.0
    again = await mutate(seed, mock, random.Random(0), envs=envs)
    assert again is not None
    assert again.id == task.id


async def test_an_update_moves_onto_another_task_of_its_initial_state(
    mock: Environment, envs: EnvPool
) -> None:
    seed = _seed(mock, "update_task_with_initialization_actions")  # creates task_2 first
    task = await mutate(seed, mock, random.Random(0), envs=envs)
    assert task is not None
    assert task.spec.initial_state == seed.spec.initial_state
    [write] = task.actions
    assert write.arguments == {"task_id": "task_1", "status": "completed"}  # the one change
    assert _gold_run(mock, task) == 1.0


async def test_mutate_gives_none_when_no_other_value_changes_anything(
    mock: Environment, envs: EnvPool
) -> None:
    # task_1 is the only task and is pending: marking it "pending" changes nothing.
    assert await mutate(_seed(mock, "update_task_1"), mock, random.Random(0), envs=envs) is None
    # A pattern about another tool: the seed's only write is not one of its tools.
    seed = _seed(mock, "create_task_1")
    assert await mutate(seed, mock, random.Random(0), ["update_task_status"], envs=envs) is None


# --- the validator --------------------------------------------------------------------------


@pytest.fixture
async def validator(
    mock: Environment, validator_on: Callable[..., Awaitable[Validator]]
) -> Validator:
    return await validator_on(mock, ValidationSettings(cpu_s=4, wall_s=10))


async def test_the_validator_accepts_a_grounded_task_and_a_mutation_but_not_a_seed_copy(
    mock: Environment, validator: Validator, envs: EnvPool
) -> None:
    create = Action(
        action_id="0", name="create_task", arguments={"user_id": "user_1", "title": "Plan"}
    )
    result = await validator.validate(proposal(grounded(mock, [create])))
    assert result.accepted, result.reasons
    mutated = await mutate(_seed(mock, "create_task_1"), mock, random.Random(1), envs=envs)
    assert mutated is not None
    assert (await validator.validate(proposal(mutated))).accepted
    seed = _seed(mock, "create_task_1").actions
    copy = await validator.validate(proposal(grounded(mock, seed, "copy")))
    assert not copy.accepted  # the seed's own gold: a duplicate of a train task
