"""`rollout.action_format: tau2` against tau2-bench itself: one scripted model through
SENTINEL's harness (RolloutRunner) and through tau2's Orchestrator (its LLMAgent and
UserSimulator, with litellm's completion replaced by the same script) on one mock task. Both
must send the model the same requests (system prompt, tool schemas, tool_choice, no token
budget, the history's roles, texts and calls) and produce the same conversation, stop handling
and termination. The `guided` format is the negative control: the comparison must see it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import litellm
import pytest
import tau2.utils.llm_utils
from litellm.types.utils import ChatCompletionMessageToolCall, Choices, Function, Message
from tau2.agent.llm_agent import AGENT_INSTRUCTION, LLMAgent
from tau2.agent.llm_agent import SYSTEM_PROMPT as TAU2_SYSTEM_PROMPT
from tau2.data_model.simulation import SimulationRun
from tau2.domains.mock.environment import get_environment, get_tasks
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation
from tau2.orchestrator.orchestrator import Orchestrator
from tau2.user.user_simulator import UserSimulator as Tau2User

from sentinel.agents.llm import Completion, RawToolCall
from sentinel.agents.rollout import RolloutRunner
from sentinel.agents.solver import SYSTEM_PROMPT, TAU2_INSTRUCTION, Solver
from sentinel.agents.user import UserSimulator, user_tools
from sentinel.config import RolloutSettings
from sentinel.envs.base import Environment
from sentinel.schemas import Trajectory

pytestmark = pytest.mark.anyio
TAU2 = RolloutSettings(action_format="tau2", max_agent_turns=10)
GUIDED = RolloutSettings(action_format="guided", max_agent_turns=10)
TASK = "create_task_1"
LONG = (
    "I have created the task 'Important Meeting' for user_1; it is pending, and you will find "
    "it in your list. ###STOP###"  # over 64 characters, and the agent's stop token
)
Call = tuple[str, str, dict[str, Any]]  # id, name, arguments


@dataclass(frozen=True)
class Turn:
    content: str | None = None
    calls: list[Call] = field(default_factory=list)


AGENT = [
    Turn(calls=[("call-1", "get_users", {})]),
    Turn(  # text and a call in one turn: tau2 runs the call, the user never sees the text
        "Creating it now.",
        [("call-2", "create_task", {"user_id": "user_1", "title": "Important Meeting"})],
    ),
    Turn(calls=[("call-3", "get_users", {}), ("call-4", "no_such_tool", {"x": 1})]),  # parallel
    Turn(LONG),  # tau2's agent cannot stop: this goes to the user
]
USER = [
    Turn("Hi, please create a task called 'Important Meeting' for user_1."),
    Turn("Thanks, that is all. ###STOP###"),
]


@dataclass
class Record:
    """What one side sent the model: per request, the messages and the options."""

    agent: list[dict[str, Any]] = field(default_factory=list)
    user: list[dict[str, Any]] = field(default_factory=list)


class ScriptedClient:
    """SENTINEL's side of the script: returns the turns in order and records each request."""

    def __init__(self, model: str, turns: list[Turn], log: list[dict[str, Any]]) -> None:
        self.model, self.turns, self.log = model, iter(turns), log

    async def complete(self, messages: list[dict[str, Any]], **options: Any) -> Completion:
        self.log.append({"messages": messages, **options})
        turn = next(self.turns)
        calls = [RawToolCall(id=i, name=n, arguments=json.dumps(a)) for i, n, a in turn.calls]
        return Completion(content=turn.content, tool_calls=calls, finish_reason="stop")


def scripted_litellm(record: Record) -> Callable[..., litellm.ModelResponse]:
    """tau2's side: litellm's `completion` as tau2's `generate` calls it, on the same script."""
    agent, user = iter(AGENT), iter(USER)

    def completion(model: str, messages: list[dict[str, Any]], **options: Any) -> Any:
        log, turns = (record.agent, agent) if model == "agent" else (record.user, user)
        log.append({"messages": messages, **options})
        turn = next(turns)
        calls = [
            ChatCompletionMessageToolCall(
                id=i, type="function", function=Function(name=n, arguments=json.dumps(a))
            )
            for i, n, a in turn.calls
        ]
        message = Message(role="assistant", content=turn.content, tool_calls=calls or None)
        return litellm.ModelResponse(
            model=model, choices=[Choices(index=0, finish_reason="stop", message=message)]
        )

    return completion


@pytest.fixture
def tau2_run(monkeypatch: pytest.MonkeyPatch) -> tuple[SimulationRun, Record]:
    """The script through tau2's Orchestrator, built as tau2's `run_task` builds it."""
    record = Record()
    monkeypatch.setattr(tau2.utils.llm_utils, "completion", scripted_litellm(record))
    monkeypatch.setattr(tau2.utils.llm_utils, "get_response_cost", lambda _: 0.0)
    task = next(t for t in get_tasks() if t.id == TASK)
    env = get_environment()
    agent = LLMAgent(tools=env.get_tools(), domain_policy=env.get_policy(), llm="agent")
    user = Tau2User(tools=None, instructions=str(task.user_scenario), llm="user")
    orchestrator = Orchestrator("mock", agent, user, env, task, max_steps=100, max_errors=10)
    return orchestrator.run(), record


async def sentinel_run(mock: Environment, settings: RolloutSettings) -> tuple[Trajectory, Record]:
    record = Record()
    solver = Solver(ScriptedClient("agent", AGENT, record.agent), mock.policy,
                    mock.tool_schemas, settings)  # fmt: skip
    user = UserSimulator(ScriptedClient("user", USER, record.user), settings,
                         user_tools(mock.user_tool_schemas))  # fmt: skip
    runner = RolloutRunner(mock, solver, user, settings=settings)
    try:
        task = next(t for t in mock.tasks() if t.id == f"mock-{TASK}")
        return await runner.run(task), record
    finally:
        await runner.aclose()


def _calls(calls: list[dict[str, Any]] | None) -> list[Call]:
    return [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in calls or []
    ]


def _messages(messages: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """A request's history as (role, text, calls, tool_call_id): the wire format's fields
    that reach the chat template (tau2 also sends `tool_calls: None` and a call's `name`)."""
    return [
        (m["role"], m.get("content") or None, _calls(m.get("tool_calls")), m.get("tool_call_id"))
        for m in messages
    ]


def differences(ours: Record, theirs: Record) -> list[str]:
    """Where the two harnesses' requests differ, by what differs."""
    found: list[str] = []
    if len(ours.agent) != len(theirs.agent) or len(ours.user) != len(theirs.user):
        found.append(f"requests: {len(ours.agent)}+{len(ours.user)} vs "
                     f"{len(theirs.agent)}+{len(theirs.user)}")  # fmt: skip
    for turn, (a, b) in enumerate(zip(ours.agent, theirs.agent, strict=False)):
        if a["messages"][0] != b["messages"][0]:
            found.append(f"agent turn {turn}: system prompt")
        if a["tools"] != b["tools"]:
            found.append(f"agent turn {turn}: tools")
        if a["tool_choice"] != b["tool_choice"]:
            found.append(f"agent turn {turn}: tool_choice {a['tool_choice']} vs {b['tool_choice']}")
        if a.get("max_tokens") is not None or "max_tokens" in b:
            found.append(f"agent turn {turn}: a token budget")
        if _messages(a["messages"][1:]) != _messages(b["messages"][1:]):
            found.append(f"agent turn {turn}: history")
    for turn, (a, b) in enumerate(zip(ours.user, theirs.user, strict=False)):
        if _messages(a["messages"]) != _messages(b["messages"]):
            found.append(f"user turn {turn}: prompt or history")
    return found


def conversation(trajectory: Trajectory) -> list[tuple[Any, ...]]:
    return [
        (m.role, m.content or None, [(c.id, c.name, c.arguments) for c in m.tool_calls],
         m.tool_call_id, m.error)
        for m in trajectory.messages
    ]  # fmt: skip


def tau2_conversation(run: SimulationRun) -> list[tuple[Any, ...]]:
    return [
        (m.role, m.content or None,
         [(c.id, c.name, c.arguments) for c in getattr(m, "tool_calls", None) or []],
         m.id if m.role == "tool" else None, bool(getattr(m, "error", False)))
        for m in run.messages
    ]  # fmt: skip


def test_the_instruction_and_system_prompt_are_tau2s() -> None:
    assert TAU2_INSTRUCTION == AGENT_INSTRUCTION
    assert SYSTEM_PROMPT.format(instruction="I", policy="P") == TAU2_SYSTEM_PROMPT.format(
        agent_instruction="I", domain_policy="P"
    )


async def test_tau2_format_matches_tau2s_orchestrator(
    mock: Environment, tau2_run: tuple[SimulationRun, Record]
) -> None:
    run, theirs = tau2_run
    trajectory, ours = await sentinel_run(mock, TAU2)
    assert len(theirs.agent) == len(AGENT)
    assert len(theirs.user) == len(USER)
    assert differences(ours, theirs) == []
    assert conversation(trajectory) == tau2_conversation(run)
    assert trajectory.termination.value == run.termination_reason == "user_stop"
    assert ours.agent[0]["tool_choice"] == "auto"
    assert ours.agent[0]["parallel_tool_calls"]
    assert [m.content for m in trajectory.messages if m.role == "assistant"][-1] == LONG
    assert trajectory.tool_errors == 1  # the unknown tool: the environment's error, as tau2's
    task = next(t for t in get_tasks() if t.id == TASK)
    tau2_reward = evaluate_simulation(
        domain="mock", task=task, simulation=run, evaluation_type=EvaluationType.ALL,
        solo_mode=False,
    ).reward  # fmt: skip
    assert trajectory.reward is not None
    assert trajectory.reward.reward == tau2_reward == 1.0


async def test_the_comparison_sees_the_guided_format(
    mock: Environment, tau2_run: tuple[SimulationRun, Record]
) -> None:
    """Negative control: guided's instruction, tools (respond, strict, capped), tool_choice
    and budget all differ from tau2's, and its agent stops on ###STOP###."""
    run, theirs = tau2_run
    trajectory, ours = await sentinel_run(mock, GUIDED)
    found = differences(ours, theirs)
    for what in ("system prompt", "tools", "tool_choice required vs auto", "a token budget"):
        assert f"agent turn 0: {what}" in found
    assert trajectory.termination.value != run.termination_reason
