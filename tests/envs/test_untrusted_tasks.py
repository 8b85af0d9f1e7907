"""What a task names beyond its agent's tools (initial-state actions, env assertions, the
user's actions) runs through tau2's `getattr` dispatch, in the reward path too: the validator
allows only the domain's own functions, and replays only where the sandbox is isolated."""

from __future__ import annotations

from typing import Any

import pytest

from sentinel.config import ValidationSettings
from sentinel.envs.base import Environment
from sentinel.envs.registry import load, named
from sentinel.envs.sandbox import LocalProcessSandbox, SandboxLimits, SandboxUnavailable
from sentinel.orchestrator.bus import Bus
from sentinel.schemas import Action, RejectionCode, Task
from sentinel.schemas.task import EnvAssertion
from sentinel.validator import RedisTaskIndex, Validator
from tests.factories import cancellation, proposal

pytestmark = pytest.mark.anyio
SETTINGS = ValidationSettings(cpu_s=4, wall_s=10, max_task_chars=6000)


def changed(task: Task, initial_state: Any = None, **criteria: Any) -> Task:
    current = task.spec.evaluation_criteria
    assert current is not None
    spec = task.spec.model_copy(
        update={"initial_state": initial_state,
                "evaluation_criteria": current.model_copy(update=criteria)}
    )  # fmt: skip
    return task.model_copy(update={"spec": spec})


@pytest.fixture(scope="module")
def telecom() -> Environment:
    return load(named("telecom"))


def validator(
    retail: Environment, bus: Bus, sandbox: LocalProcessSandbox, **settings: Any
) -> Validator:
    index = RedisTaskIndex(bus.redis, bus.settings.prefix, retail)
    return Validator(retail, sandbox, SETTINGS.model_copy(update=settings), index)


async def test_functions_outside_the_allow_lists_are_rejected_with_reasons(
    retail: Environment, bus: Bus
) -> None:
    task = cancellation(retail, "allow-list", nth=4)
    names = ("__init__", "_private", "update_db", "no_such_function", "calculate")
    hostile = [
        changed(task, env_assertions=[EnvAssertion(env_type="assistant", func_name=n,
                                                   arguments={})])
        for n in names
    ]  # fmt: skip
    init = {"initialization_actions": [
        {"env_type": "assistant", "func_name": "update_db", "arguments": {"update_data": {}}},
    ]}  # fmt: skip
    hostile.append(changed(task, initial_state=init))
    user_action = Action(action_id="u", requestor="user", name="cancel_pending_order", arguments={})
    hostile.append(changed(task, actions=[*task.actions, user_action]))
    async with LocalProcessSandbox(SandboxLimits(cpu_s=4, wall_s=10), warm=0) as sandbox:
        check = validator(retail, bus, sandbox)
        for bad in hostile:
            result = await check.validate(proposal(bad))
            assert not result.accepted
            assert [r.code for r in result.reasons] == [RejectionCode.UNKNOWN_TOOL], result
            assert "use one of" in result.reasons[0].detail
        shapeless = changed(task, initial_state={"initialization_actions": "update_db"})
        result = await check.validate(proposal(shapeless))
        assert [r.code for r in result.reasons] == [RejectionCode.SCHEMA], result
        accepted = await check.validate(proposal(task))  # the same task, unchanged
    assert accepted.accepted, accepted.reasons


def test_every_seed_task_passes_the_allow_lists_and_impostors_do_not(
    telecom: Environment,
) -> None:
    assert [p for t in telecom.tasks() for p in telecom.call_problems(t)] == []
    assert "assert_service_status" in telecom.assertion_functions("user")
    assert "set_user_info" in telecom.functions("user")  # an initial-state setter
    assert "set_user_info" not in telecom.assertion_functions("user")  # returns no bool
    assert not telecom.functions("user") & {"update_db", "use_tool", "get_db_hash", "__init__"}
    seed = next(t for t in telecom.tasks() if t.spec.initial_state)
    bad_init = {"initialization_actions": [
        {"env_type": "user", "func_name": "__class__", "arguments": {}},
        {"env_type": "system", "func_name": "set_user_info", "arguments": {}},
    ]}  # fmt: skip
    problems = telecom.call_problems(
        changed(seed, initial_state=bad_init, actions=[
            Action(action_id="u", requestor="user", name="get_customer_by_id", arguments={}),
        ], env_assertions=[
            EnvAssertion(env_type="user", func_name="set_user_info", arguments={}),
        ])
    )  # fmt: skip
    assert len(problems) == 4, problems
    assert "'__class__' is not a user function" in problems[0]
    assert "env_type must be" in problems[1]
    assert "env_assertion 0: 'set_user_info'" in problems[2]
    assert "not a user tool" in problems[3]


async def test_a_replay_without_isolation_is_refused_unless_waived(
    retail: Environment, bus: Bus
) -> None:
    task = cancellation(retail, "no-isolation", nth=5)
    async with LocalProcessSandbox(SandboxLimits(cpu_s=4, wall_s=10), isolation="off") as sandbox:
        with pytest.raises(SandboxUnavailable, match="allow_no_network_isolation"):
            await validator(retail, bus, sandbox).validate(proposal(task))
        waived = validator(retail, bus, sandbox, allow_no_network_isolation=True)
        result = await waived.validate(proposal(task))
    assert result.accepted, result.reasons
