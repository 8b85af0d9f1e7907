"""Airline seed tasks moved onto other users (replayed in an `EnvPool`), and the validator
accepting a grounded task and a mutated one."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sentinel.config import ValidationSettings
from sentinel.envs.base import Environment
from sentinel.envs.episodes import EnvPool
from sentinel.envs.grounding import grounder, mutate
from sentinel.envs.tau2.airline.grounder import AirlineGrounder
from sentinel.schemas import (
    EvaluationCriteria,
    Origin,
    RejectionCode,
    Task,
    ToolCall,
    UserInstructions,
)
from sentinel.validator import Validator
from tests.envs.tau2.airline.helpers import grounded_task
from tests.envs.test_sandbox import sandbox_pids
from tests.factories import proposal

pytestmark = pytest.mark.anyio
SEEDS = ("airline-9", "airline-12", "airline-17", "airline-20", "airline-27", "airline-40")


@pytest.fixture
async def envs() -> AsyncIterator[EnvPool]:
    async with EnvPool("airline", tool_timeout_s=5.0) as pool:
        yield pool
    assert sandbox_pids(pool.id) == []


def _seed(env: Environment, task_id: str) -> Task:
    return next(t for t in env.tasks("train") if t.id == task_id)


def _writes(env: Environment, task: Task) -> list[str]:
    return [a.name for a in task.actions if a.name in env.write_tools]


async def test_seeds_move_onto_other_users_whose_gold_writes_succeed(
    airline: Environment, envs: EnvPool
) -> None:
    chosen = grounder(airline)
    assert isinstance(chosen, AirlineGrounder)
    for i, seed_id in enumerate(SEEDS):
        seed = _seed(airline, seed_id)
        task = await mutate(seed, airline, random.Random(i), envs=envs)
        assert task is not None, seed_id
        assert task.provenance.origin == Origin.MUTATED
        assert _writes(airline, task) == _writes(airline, seed)
        [user] = chosen.actors(task.actions)
        assert user not in chosen.actors(seed.actions) | chosen.held_out
        instructions = task.spec.user_scenario.instructions
        assert isinstance(instructions, UserInstructions)
        assert f"Your user id is {user}." in (instructions.known_info or "")
        episode = airline.episode(task)  # here too: every gold call runs, the state changes
        before = episode.db_hashes()
        for a in task.actions:
            call = ToolCall(id=a.action_id, name=a.name, arguments=a.arguments)
            assert not episode.step(call).error, (seed_id, a)
        assert episode.db_hashes() != before


async def test_a_focused_mutation_keeps_only_the_patterns_writes(
    airline: Environment, envs: EnvPool
) -> None:
    seed = _seed(airline, "airline-17")  # flights, passengers and bags on one reservation
    tools = ["update_reservation_baggages"]
    task = await mutate(seed, airline, random.Random(3), tools, envs=envs)
    assert task is not None
    assert _writes(airline, task) == tools
    reads_only = _seed(airline, "airline-1")  # no gold writes: nothing to move
    assert await mutate(reads_only, airline, random.Random(0), envs=envs) is None


@pytest.fixture
async def validator(
    airline: Environment, validator_on: Callable[..., Awaitable[Validator]]
) -> Validator:
    # a busy CI machine loads airline slowly: a CI run spent over 4 CPU seconds on one replay
    return await validator_on(airline, ValidationSettings(cpu_s=15, wall_s=30))


async def test_the_validator_accepts_grounded_and_mutated_tasks(
    airline: Environment, validator: Validator, envs: EnvPool
) -> None:
    for tool in ("update_reservation_flights", "cancel_reservation"):
        task = grounded_task(airline, tool, 0, f"grounded-{tool}")
        result = await validator.validate(proposal(task))
        assert result.accepted, (tool, result.reasons)
    mutated = await mutate(_seed(airline, "airline-12"), airline, random.Random(5), envs=envs)
    assert mutated is not None
    result = await validator.validate(proposal(mutated))
    assert result.accepted, result.reasons


async def test_the_validator_refuses_gold_that_breaks_the_state_rules(
    airline: Environment, validator: Validator
) -> None:
    """tau2's airline tools cancel a reservation twice without a word; the pack's rules do
    not, and a task whose gold does it teaches the agent the opposite of the policy."""
    task = grounded_task(airline, "cancel_reservation", 0, "grounded-twice")
    lookup, cancel = task.actions
    twice = [lookup, cancel, cancel.model_copy(update={"action_id": "2"})]
    criteria = EvaluationCriteria(actions=twice, communicate_info=[])
    task = task.model_copy(
        update={"spec": task.spec.model_copy(update={"evaluation_criteria": criteria})}
    )
    result = await validator.validate(proposal(task))
    assert not result.accepted
    assert [r.code for r in result.reasons] == [RejectionCode.POLICY_VIOLATION]
    assert "action 2: cancel_reservation on reservation" in result.reasons[0].detail
    assert "'cancelled'" in result.reasons[0].detail
