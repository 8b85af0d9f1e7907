"""Telecom's user tools in real rollouts: the user's calls step on the real episode (both
sides' state), and the reward equals tau2's own evaluator on the same conversation. The two
LLMs are scripted (canned completions); the environment is tau2's telecom."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from tau2.data_model.simulation import SimulationRun
from tau2.data_model.simulation import TerminationReason as Tau2Termination
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation

from sentinel.agents.llm import Completion, RawToolCall
from sentinel.agents.rollout import RolloutRunner
from sentinel.agents.solver import Solver
from sentinel.agents.user import UserSimulator, user_tools
from sentinel.config import RolloutSettings
from sentinel.envs.base import Environment
from sentinel.envs.tau2.env import to_tau2_messages, to_tau2_task
from sentinel.schemas import Action, ChatMessage, Task, TerminationReason, Trajectory

pytestmark = pytest.mark.anyio
SETTINGS = RolloutSettings(max_agent_turns=8, concurrency=1)
# One agent write (refuel_data) and one user action (toggle_data) in its gold.
TASK = "telecom-[mobile_data_issue]data_mode_off|data_usage_exceeded[PERSONA:None]"


def tau2_reward(task: Task, messages: list[ChatMessage], termination: TerminationReason) -> float:
    """tau2's own evaluator on the conversation: it replays both sides' calls itself."""
    now = datetime.now(UTC).isoformat()
    run = SimulationRun(
        id=uuid.uuid4().hex, task_id=task.spec.id, start_time=now, end_time=now, duration=0.0,
        termination_reason=Tau2Termination(termination.value), messages=to_tau2_messages(messages),
    )  # fmt: skip
    info = evaluate_simulation(run, to_tau2_task(task), EvaluationType.ALL, False, "telecom")
    return float(info.reward)


class Scripted:
    """A ChatClient that replays canned completions and keeps what it was shown."""

    model = "scripted"

    def __init__(self, completions: list[Completion]) -> None:
        self.completions: Iterator[Completion] = iter(completions)
        self.seen: list[list[dict[str, Any]]] = []

    async def complete(self, messages: list[dict[str, Any]], **_: Any) -> Completion:
        self.seen.append(messages)
        return next(self.completions)


def says(text: str) -> Completion:
    return Completion(content=text, finish_reason="stop")


def calls(name: str, arguments: str | dict[str, Any], call_id: str) -> Completion:
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    call = RawToolCall(id=call_id, name=name, arguments=raw)
    return Completion(tool_calls=[call], finish_reason="tool_calls")


def respond(text: str, call_id: str) -> Completion:
    return calls("respond", {"content": text}, call_id)


def task(env: Environment, task_id: str = TASK) -> Task:
    return next(t for t in env.tasks("train") if t.id == task_id)


def gold(t: Task, requestor: str) -> list[Action]:
    return [a for a in t.actions if a.requestor == requestor]


async def roll_out(
    env: Environment, t: Task, agent: list[Completion], user: list[Completion]
) -> tuple[Trajectory, Scripted, Scripted]:
    solver_client, user_client = Scripted(agent), Scripted(user)
    solver = Solver(solver_client, env.policy, env.tool_schemas, SETTINGS)
    simulator = UserSimulator(user_client, SETTINGS, user_tools(env.user_tool_schemas))
    runner = RolloutRunner(env, solver, simulator, settings=SETTINGS)
    try:
        trajectory = await runner.run(t)
    finally:
        await runner.aclose()
    return trajectory, solver_client, user_client


def agent_script(t: Task) -> list[Completion]:
    writes = [calls(a.name, a.arguments, f"agent-{i}") for i, a in enumerate(gold(t, "assistant"))]
    return [*writes, respond("Please turn your mobile data on.", "agent-say")]


async def test_the_users_tool_calls_step_on_the_episode_and_score_as_tau2(
    telecom: Environment,
) -> None:
    t = task(telecom)
    user_actions = gold(t, "user")
    assert user_actions, "the task's gold has user actions"
    user = [
        says("My mobile data does not work."),
        *[calls(a.name, a.arguments, f"user-{i}") for i, a in enumerate(user_actions)],
        says("It works now, thanks! ###STOP###"),
    ]
    trajectory, solver_client, user_client = await roll_out(telecom, t, agent_script(t), user)
    assert trajectory.termination is TerminationReason.USER_STOP
    user_calls = [c for m in trajectory.messages if m.role == "user" for c in m.tool_calls]
    assert [c.name for c in user_calls] == [a.name for a in user_actions]
    assert {c.requestor for c in user_calls} == {"user"}
    results = {m.tool_call_id: m for m in trajectory.messages if m.role == "tool"}
    assert all(not results[c.id].error for c in user_calls)
    assert trajectory.reward is not None
    assert trajectory.reward.reward == 1.0  # the phone's state counts: toggle_data ran
    assert trajectory.reward.reward == tau2_reward(t, trajectory.messages, trajectory.termination)
    # The agent never sees the user's phone; the user sees its own results, not the agent's.
    agent_view = json.dumps(solver_client.seen)
    assert not any(c.id in agent_view for c in user_calls)
    last_user_view = user_client.seen[-1]
    assert [m["role"] for m in last_user_view[-2:]] == ["assistant", "tool"]
    assert "agent-0" not in json.dumps(user_client.seen)


async def test_without_the_users_tool_calls_the_task_fails_as_in_tau2(
    telecom: Environment,
) -> None:
    t = task(telecom)
    user = [says("My mobile data does not work."), says("Done, thanks! ###STOP###")]
    trajectory, _, _ = await roll_out(telecom, t, agent_script(t), user)
    assert trajectory.reward is not None
    assert trajectory.reward.reward == 0.0
    assert trajectory.reward.reward == tau2_reward(t, trajectory.messages, trajectory.termination)


async def test_hostile_user_tool_calls_become_error_results(telecom: Environment) -> None:
    t = task(telecom)
    user = [
        says("My mobile data does not work."),
        calls("rm_rf_everything", {}, "u-unknown"),
        calls("toggle_data", {"bogus": 1}, "u-args"),
        calls(
            "refuel_data",
            {"customer_id": "C1001", "line_id": "L1002", "gb_amount": 9},
            "u-agent-tool",
        ),
        calls("__init__", {}, "u-private"),
        says("Nothing works. ###STOP###"),
    ]
    trajectory, _, _ = await roll_out(telecom, t, agent_script(t), user)
    assert trajectory.termination is TerminationReason.USER_STOP
    results = {m.tool_call_id: m for m in trajectory.messages if m.role == "tool"}
    for call_id in ("u-unknown", "u-args", "u-agent-tool", "u-private"):
        assert results[call_id].error, call_id
        assert "Error" in (results[call_id].content or "")
    assert trajectory.tool_errors == 0  # the user's errors are not the agent's
    assert trajectory.reward is not None
    assert trajectory.reward.reward == tau2_reward(t, trajectory.messages, trajectory.termination)


async def test_user_arguments_that_are_not_json_end_the_rollout_as_the_simulators_failure(
    telecom: Environment,
) -> None:
    t = task(telecom)
    user = [says("My mobile data does not work."), calls("toggle_data", "{not json", "u-bad")]
    trajectory, _, _ = await roll_out(telecom, t, agent_script(t), user)
    assert trajectory.termination is TerminationReason.INFRA_ERROR


async def test_a_user_that_only_calls_tools_runs_out_of_steps(telecom: Environment) -> None:
    t = task(telecom)
    user = [says("Hi."), *[calls("check_status_bar", {}, f"u-{i}") for i in range(50)]]
    trajectory, _, _ = await roll_out(telecom, t, agent_script(t), user)
    assert trajectory.termination is TerminationReason.MAX_STEPS
