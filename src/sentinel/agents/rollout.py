"""One Solver rollout on one task: the agent, the simulated user and the environment in turn.

The flow follows tau2-bench's orchestrator: the agent greets, the user answers, and then the
agent either calls a tool (the environment answers, the agent goes again) or talks (the user
answers). It ends when the user sends a stop token, the agent says ###STOP### (in the
`guided` format; tau2's own agent never ends a conversation), a budget runs out, the
context is full, the endpoint fails, or a tool call runs past its limits; every ending has
its termination reason, and the trajectory is scored by tau2's rules.

The environment is never in this process: episodes live in limited children
(`envs.episodes.EnvPool`), so a hostile tool call (a calculator tool on `9**9**9`) is
stopped at `rollout.tool_timeout_s` and ends its rollout with `tool_timeout`, while this event
loop, and the other rollouts on it, go on. tau2's reward is computed there too.
"""

from __future__ import annotations

import time

import anyio

from sentinel.agents.llm import ContextLengthExceeded, LLMError, OpenAIChatClient
from sentinel.agents.scripted_user import ScriptedUser
from sentinel.agents.solver import AgentTurn, Solver
from sentinel.agents.transcript import (
    Template,
    TemplateError,
    Transcript,
    guided_schema,
    sample_turn,
)
from sentinel.agents.user import User, UserSimulator, is_stop, user_tools
from sentinel.config import RolloutSettings, Settings
from sentinel.envs.base import STOPPED, Environment, unscored
from sentinel.envs.episodes import EnvFailure, EnvPool, RemoteEpisode, ToolStopped
from sentinel.envs.sandbox import SandboxLimits
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
from sentinel.training.publisher import cache_salt

log = get_logger(__name__)

GREETING = "Hi! How can I help you today?"
# Tool calls a user with tools of its own (a phone) may make before it says something to the
# agent: a simulator that only calls tools ends the rollout with max_steps, as tau2's step
# budget would.
MAX_USER_TOOL_ROUNDS = 10


class Rollout:
    """The mutable state of one conversation, turned into a Trajectory at the end."""

    def __init__(
        self, task: Task, episode: RemoteEpisode, user_prompt: str, max_turns: int
    ) -> None:
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
        self.transcript: Transcript | None = None  # rollout.token_io: the growing sequence
        self.timings = Timings()

    @classmethod
    def resumed(
        cls,
        task: Task,
        trajectory: Trajectory,
        step: int,
        episode: RemoteEpisode,
        user_prompt: str,
    ) -> Rollout:
        """The state just before message `step` of `trajectory`, its counters included;
        `episode` must be the prefix's tool calls replayed."""
        state = cls(task, episode, user_prompt, max_turns=0)
        state.messages = list(trajectory.messages[:step])
        state.turns = [t for t in trajectory.turns if t.message_index < step]
        state.malformed = sum(m.role == "assistant" and m.error for m in state.messages)
        users = {c.id for m in state.messages if m.role == "user" for c in m.tool_calls}
        state.tool_errors = sum(
            m.role == "tool" and m.error and m.tool_call_id not in users for m in state.messages
        )  # the agent's: the user's own tool errors are not the agent's budget
        return state


class RolloutRunner:
    """Runs rollouts concurrently, at most `settings.concurrency` at once across all callers;
    their episodes live in `envs` (by default a pool of its own, stopped by `aclose`)."""

    def __init__(
        self,
        domain: Environment,
        solver: Solver,
        user: User,
        *,
        settings: RolloutSettings,
        policy_version: int = 0,
        envs: EnvPool | None = None,
        compact_json: bool = True,
    ) -> None:
        self.domain = domain
        self.compact_json = compact_json  # the policy server's serve.compact_json
        self.solver = solver
        self.user = user
        self.settings = settings
        self.policy_version = policy_version
        self.limiter = anyio.CapacityLimiter(settings.concurrency)
        self._template: Template | None = None  # the served template's junction, learned once
        self._own_envs = envs is None
        self.envs = envs or EnvPool(
            domain.settings,
            tool_timeout_s=settings.tool_timeout_s,
            processes=settings.env_processes,
            limits=SandboxLimits(memory_mb=settings.env_memory_mb),
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, domain: Environment, policy: str | None = None, version: int = 0
    ) -> RolloutRunner:
        """A runner whose Solver uses `llm.policy` (or the served name `policy`)."""
        salt = cache_salt(version)  # the prefix cache holds this policy's KV blocks only
        solver_client = OpenAIChatClient(settings.llm.policy, model=policy, cache_salt=salt)
        user: User = ScriptedUser(domain)
        if settings.rollout.user == "llm":
            user_client = OpenAIChatClient(settings.llm.user_sim)
            user = UserSimulator(
                user_client, settings.rollout, user_tools(domain.user_tool_schemas)
            )
        policy_text, tools = domain.policy, domain.tool_schemas
        if settings.rollout.lean_prompt:  # a small context: the pack's condensed rendering
            policy_text, tools = domain.pack.lean_policy(policy_text), domain.pack.lean_tools(tools)
        return cls(
            domain,
            Solver(solver_client, policy_text, tools, settings.rollout),
            user,
            settings=settings.rollout,
            policy_version=version,
            compact_json=settings.serve.compact_json,
        )

    async def aclose(self) -> None:
        """Close the endpoints' connections and stop the environment children (call before
        the event loop ends)."""
        for client in (self.solver.client, self.user.client):
            close = getattr(client, "aclose", None)
            if close is not None:
                await close()
        if self._own_envs:
            await self.envs.aclose()

    async def run(
        self, task: Task, group_id: str | None = None, trajectory_id: str | None = None
    ) -> Trajectory:
        async with self.limiter:
            try:
                episode = await self.envs.open(task)
            except EnvFailure as error:
                return self._lost(task, str(error), group_id, trajectory_id)
            try:
                prompt = self.domain.user_prompt(task)
                state = Rollout(task, episode, prompt, self.settings.max_agent_turns)
                termination = await self._converse(state)
                return await self._finish(state, termination, group_id, trajectory_id)
            finally:
                await episode.close()

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
            try:
                state = await self.resume(task, trajectory, step)
            except EnvFailure as error:
                return self._lost(task, str(error), trajectory.group_id, trajectory_id)
            try:
                state.max_turns, state.experience = max_turns, experience
                termination = await self._converse(state, opening=False)
                return await self._finish(state, termination, trajectory.group_id, trajectory_id)
            finally:
                await state.episode.close()

    async def resume(self, task: Task, trajectory: Trajectory, step: int) -> Rollout:
        """The conversation and environment just before message `step` of `trajectory`; the
        prefix's calls are replayed in an environment child, under the same limits. Raises
        `EnvFailure` if that fails; close the state's episode when done."""
        prefix = trajectory.messages[:step]
        calls = [  # the user's calls too (a user's own tools), in order: both sides' state
            c for m in prefix if m.role in ("assistant", "user") and not m.error
            for c in m.tool_calls
        ]  # fmt: skip
        episode = await self.envs.open(task, calls)
        return Rollout.resumed(task, trajectory, step, episode, self.domain.user_prompt(task))

    def _lost(
        self, task: Task, error: str, group_id: str | None, trajectory_id: str | None
    ) -> Trajectory:
        """The trajectory of a rollout whose environment could not be opened: infra."""
        log.warning("rollout without an environment", task=task.id, error=error)
        messages = [ChatMessage(role="assistant", content=GREETING)]
        termination = TerminationReason.INFRA_ERROR
        return Trajectory(
            id=trajectory_id or new_id(), task_id=task.id, domain=task.domain, group_id=group_id,
            policy_version=self.policy_version, policy_model=self.solver.client.model,
            messages=messages, termination=termination,
            reward=unscored(task, messages, termination), timings=Timings(finished_at=utc_now()),
        )  # fmt: skip

    async def _finish(
        self,
        state: Rollout,
        termination: TerminationReason,
        group_id: str | None,
        trajectory_id: str | None,
    ) -> Trajectory:
        task = state.task
        if termination in STOPPED:
            try:
                reward = await state.episode.reward(state.messages, termination)
            except EnvFailure as error:
                log.warning("rollout not scored", task=task.id, error=str(error))
                termination = TerminationReason.INFRA_ERROR
        if termination not in STOPPED:  # no environment needed: it scores 0
            reward = unscored(task, state.messages, termination)
        state.timings.finished_at = utc_now()
        return Trajectory(
            id=trajectory_id or new_id(), task_id=task.id, domain=task.domain, group_id=group_id,
            policy_version=self.policy_version, policy_model=self.solver.client.model,
            messages=state.messages, turns=state.turns, termination=termination, reward=reward,
            tokens=state.transcript.segments if state.transcript else [],
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
            if opening and (ending := await self._user_turn(state)) is not None:
                return ending
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
        turn = await self._act(state)
        state.timings.llm_s += time.monotonic() - started
        state.agent_turns += 1
        if turn.tokens is not None:
            state.turns.append(turn.tokens)
        state.messages.append(turn.message)
        if turn.malformed is not None:
            state.malformed += 1
            state.messages.append(self.solver.error_observation(turn.malformed))
            return None
        if turn.message.tool_calls:
            return await self._run_tools(state, turn.message)
        if turn.stops:
            return TerminationReason.AGENT_STOP
        return await self._user_turn(state)

    async def _act(self, state: Rollout) -> AgentTurn:
        """The Solver's turn; with `rollout.token_io`, sampled by token ids from the rollout's
        growing sequence (agents.transcript), else the Solver's chat completion."""
        if not self.settings.token_io:
            return await self.solver.act(state.messages, state.experience)
        solver, client = self.solver, self.solver.client
        if not isinstance(client, OpenAIChatClient):
            raise LLMError("rollout.token_io needs a vLLM endpoint (token ids in and out)")
        if state.transcript is None:  # a rollout's first turn, or a LEAFE branch's
            if self._template is None:
                try:
                    self._template = await Template.learn(client)
                except TemplateError as error:
                    raise LLMError(f"the served chat template: {error}") from error
            temperature = self.settings.temperature
            state.transcript = Transcript(
                client, self._template, solver.tools, temperature, compact_json=self.compact_json
            )
        request = solver.request
        sampled = await sample_turn(
            solver, state.transcript, state.messages, max_tokens=request.max_tokens,
            experience=state.experience,
            json_schema=guided_schema(request.tools) if solver.guided else None,
        )  # fmt: skip
        return AgentTurn(
            message=sampled.message, tokens=None, malformed=sampled.malformed,
            can_stop=solver.guided,
        )  # fmt: skip

    async def _run_tools(
        self, state: Rollout, message: ChatMessage, agent: bool = True
    ) -> TerminationReason | None:
        """Each call in the environment child; one stopped at its limits ends the rollout
        (`tool_timeout`), and so does an environment that failed (`infra_error`). The user's
        calls (not `agent`) run the same way; their errors are not the agent's."""
        started = time.monotonic()
        ending: TerminationReason | None = None
        for call in message.tool_calls:
            if ending is not None:
                content, error = "not run: an earlier call failed", True
            else:
                try:
                    result = await state.episode.step(call)
                    content, error = result.content, result.error
                except ToolStopped as stopped:
                    log.warning("tool call stopped", task=state.task.id, tool=call.name,
                                error=str(stopped))  # fmt: skip
                    content, error = f"Error: the tool call was stopped: {stopped}", True
                    ending = TerminationReason.TOOL_TIMEOUT
                except EnvFailure as failure:
                    log.warning("environment failed", task=state.task.id, error=str(failure))
                    content, error = f"Error: the environment failed: {failure}", True
                    ending = TerminationReason.INFRA_ERROR
            state.tool_errors += error and agent
            state.messages.append(
                ChatMessage(role="tool", content=content, tool_call_id=call.id, error=error)
            )
        state.timings.env_s += time.monotonic() - started
        return ending

    async def _user_turn(self, state: Rollout) -> TerminationReason | None:
        """The user answers, first running any tools of its own (requestor user, on the same
        episode, their results for the user alone); the ending if that ended the
        conversation, None if it is the agent's turn."""
        for _ in range(MAX_USER_TOOL_ROUNDS):
            started = time.monotonic()
            reply = await self.user.reply(state.user_prompt, state.messages, state.task)
            state.timings.user_s += time.monotonic() - started
            state.messages.append(reply)
            if not reply.tool_calls:
                return TerminationReason.USER_STOP if is_stop(reply) else None
            if (ending := await self._run_tools(state, reply, agent=False)) is not None:
                return ending
        return TerminationReason.MAX_STEPS
