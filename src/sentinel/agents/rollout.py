"""One Solver rollout on one task: the agent, the simulated user and the environment in turn.

The flow follows tau2-bench's orchestrator: the agent greets, the user answers, and then the
agent either calls a tool (the environment answers, the agent goes again) or talks (the user
answers). It ends when the user sends a stop token, the agent says ###STOP###, a budget runs
out, the context is full, or the endpoint fails; every ending has its termination reason,
and the trajectory is scored by tau2's rules.
"""

from __future__ import annotations

import time

import anyio

from sentinel.agents.llm import ContextLengthExceeded, LLMError, OpenAIChatClient
from sentinel.agents.solver import Solver, error_observation
from sentinel.agents.user import UserSimulator, is_stop
from sentinel.config import RolloutSettings, Settings
from sentinel.envs.tau2 import Episode, Tau2Domain
from sentinel.logs import get_logger
from sentinel.schemas import (
    ChatMessage,
    RolloutGroup,
    Task,
    TerminationReason,
    Timings,
    Trajectory,
    TurnTokens,
)
from sentinel.schemas.message import new_id, utc_now

log = get_logger(__name__)

GREETING = "Hi! How can I help you today?"


class Rollout:
    """The mutable state of one conversation, turned into a Trajectory at the end."""

    def __init__(self, task: Task, episode: Episode, user_prompt: str, max_turns: int) -> None:
        self.task = task
        self.episode = episode
        self.user_prompt = user_prompt
        self.messages: list[ChatMessage] = [ChatMessage(role="assistant", content=GREETING)]
        self.turns: list[TurnTokens] = []
        self.malformed = 0
        self.tool_errors = 0
        self.agent_turns = 0
        self.max_turns = max_turns
        self.experience: str | None = None  # LEAFE: shown to the Solver in a branch
        self.timings = Timings()

    @classmethod
    def resumed(
        cls, task: Task, trajectory: Trajectory, step: int, episode: Episode, user_prompt: str
    ) -> Rollout:
        """The state just before message `step` of `trajectory`, its counters included;
        `episode` must be the prefix's tool calls replayed."""
        state = cls(task, episode, user_prompt, max_turns=0)
        state.messages = list(trajectory.messages[:step])
        state.turns = [t for t in trajectory.turns if t.message_index < step]
        state.malformed = sum(m.role == "assistant" and m.error for m in state.messages)
        state.tool_errors = sum(m.role == "tool" and m.error for m in state.messages)
        return state


class RolloutRunner:
    """Runs rollouts concurrently, at most `settings.concurrency` at once across all callers."""

    def __init__(
        self,
        domain: Tau2Domain,
        solver: Solver,
        user: UserSimulator,
        *,
        settings: RolloutSettings,
        policy_version: int = 0,
    ) -> None:
        self.domain = domain
        self.solver = solver
        self.user = user
        self.settings = settings
        self.policy_version = policy_version
        self.limiter = anyio.CapacityLimiter(settings.concurrency)

    @classmethod
    def from_settings(
        cls, settings: Settings, domain: Tau2Domain, policy: str | None = None, version: int = 0
    ) -> RolloutRunner:
        """A runner whose Solver uses `llm.policy` (or the served name `policy`)."""
        solver_client = OpenAIChatClient(settings.llm.policy, model=policy)
        user_client = OpenAIChatClient(settings.llm.user_sim)
        return cls(
            domain,
            Solver(solver_client, domain.policy, domain.tool_schemas, settings.rollout),
            UserSimulator(user_client, settings.rollout),
            settings=settings.rollout,
            policy_version=version,
        )

    async def aclose(self) -> None:
        """Close the endpoints' connections (call before the event loop ends)."""
        for client in (self.solver.client, self.user.client):
            close = getattr(client, "aclose", None)
            if close is not None:
                await close()

    async def run(
        self, task: Task, group_id: str | None = None, trajectory_id: str | None = None
    ) -> Trajectory:
        async with self.limiter:
            episode = await anyio.to_thread.run_sync(self.domain.episode, task)
            prompt = self.domain.user_prompt(task)
            state = Rollout(task, episode, prompt, self.settings.max_agent_turns)
            termination = await self._converse(state)
            return await self._finish(state, termination, group_id, trajectory_id)

    async def branch(
        self,
        task: Task,
        trajectory: Trajectory,
        step: int,
        experience: str | None,
        max_turns: int,
        trajectory_id: str | None = None,
    ) -> Trajectory:
        """LEAFE's branch: the conversation again from message `step` (an agent turn), with the
        environment rebuilt by replaying the prefix's tool calls, at most `max_turns` agent
        turns more, and the Solver shown `experience`. Scored by the same tau2 reward."""
        async with self.limiter:
            state = await self.resume(task, trajectory, step)
            state.max_turns, state.experience = max_turns, experience
            termination = await self._converse(state, opening=False)
            return await self._finish(state, termination, trajectory.group_id, trajectory_id)

    async def resume(self, task: Task, trajectory: Trajectory, step: int) -> Rollout:
        """The conversation and environment just before message `step` of `trajectory`."""
        prefix = trajectory.messages[:step]
        calls = [c for m in prefix if m.role == "assistant" and not m.error for c in m.tool_calls]
        episode = await anyio.to_thread.run_sync(self.domain.replay, task, calls)
        return Rollout.resumed(task, trajectory, step, episode, self.domain.user_prompt(task))

    async def _finish(
        self,
        state: Rollout,
        termination: TerminationReason,
        group_id: str | None,
        trajectory_id: str | None,
    ) -> Trajectory:
        task = state.task
        reward = await anyio.to_thread.run_sync(
            self.domain.reward, task, state.episode, state.messages, termination
        )
        state.timings.finished_at = utc_now()
        return Trajectory(
            id=trajectory_id or new_id(), task_id=task.id, domain=task.domain, group_id=group_id,
            policy_version=self.policy_version, policy_model=self.solver.client.model,
            messages=state.messages, turns=state.turns, termination=termination, reward=reward,
            malformed_turns=state.malformed, tool_errors=state.tool_errors, timings=state.timings,
        )  # fmt: skip

    async def run_group(self, task: Task, size: int, group_id: str | None = None) -> RolloutGroup:
        """`size` concurrent rollouts of one task: GRPO's unit. Trajectory ids derive from the
        group's, so a group rolled out again (a redelivery) replaces, not adds."""
        group_id = group_id or new_id()
        trajectories: list[Trajectory | None] = [None] * size

        async def one(index: int) -> None:
            trajectories[index] = await self.run(task, group_id, f"{group_id}-{index}")

        async with anyio.create_task_group() as tg:
            for index in range(size):
                tg.start_soon(one, index)
        return RolloutGroup(
            id=group_id, task_id=task.id, policy_version=self.policy_version,
            trajectories=[t for t in trajectories if t is not None],
        )  # fmt: skip

    async def _converse(self, state: Rollout, opening: bool = True) -> TerminationReason:
        """Talk until an ending; `opening`: the user answers the greeting first."""
        try:
            if opening and await self._user_turn(state):
                return TerminationReason.USER_STOP
            while True:
                if state.agent_turns >= state.max_turns:
                    return TerminationReason.MAX_STEPS
                if state.malformed + state.tool_errors >= self.settings.max_errors:
                    return TerminationReason.TOO_MANY_ERRORS
                ending = await self._agent_turn(state)
                if ending is not None:
                    return ending
        except ContextLengthExceeded:
            return TerminationReason.CONTEXT_LENGTH
        except LLMError as error:
            log.warning("rollout ended by the endpoint", task=state.task.id, error=str(error))
            return TerminationReason.INFRA_ERROR

    async def _agent_turn(self, state: Rollout) -> TerminationReason | None:
        started = time.monotonic()
        turn = await self.solver.act(state.messages, state.experience)
        state.timings.llm_s += time.monotonic() - started
        state.agent_turns += 1
        if turn.tokens is not None:
            state.turns.append(turn.tokens)
        state.messages.append(turn.message)
        if turn.malformed is not None:
            state.malformed += 1
            state.messages.append(error_observation(turn.malformed))
            return None
        if turn.message.tool_calls:
            self._run_tools(state, turn.message)
            return None
        if turn.stops:
            return TerminationReason.AGENT_STOP
        return TerminationReason.USER_STOP if await self._user_turn(state) else None

    def _run_tools(self, state: Rollout, message: ChatMessage) -> None:
        started = time.monotonic()
        for call in message.tool_calls:
            result = state.episode.step(call)
            state.tool_errors += result.error
            state.messages.append(
                ChatMessage(
                    role="tool", content=result.content, tool_call_id=call.id, error=result.error
                )
            )
        state.timings.env_s += time.monotonic() - started

    async def _user_turn(self, state: Rollout) -> bool:
        """The user answers; True if it ended the conversation."""
        started = time.monotonic()
        reply = await self.user.reply(state.user_prompt, state.messages)
        state.timings.user_s += time.monotonic() - started
        state.messages.append(reply)
        return is_stop(reply)
