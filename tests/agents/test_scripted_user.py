"""The scripted user: in role, from the task's own scenario, on tau2's mock domain; and a
real rollout of the Solver against it."""

from __future__ import annotations

import pytest

from sentinel.agents.rollout import GREETING, RolloutRunner
from sentinel.agents.scripted_user import DONE, GIVE_UP, ScriptedUser
from sentinel.agents.user import is_stop
from sentinel.config import RolloutSettings, Settings
from sentinel.envs.base import Environment
from sentinel.envs.registry import load, named
from sentinel.schemas import ChatMessage, Task, TerminationReason, ToolCall
from sentinel.usersim.fidelity import Prober
from sentinel.usersim.rules import simulator_fault


@pytest.fixture
def create(mock: Environment) -> Task:
    return next(t for t in mock.tasks("train") if t.id == "mock-create_task_1")


def agent(text: str) -> ChatMessage:
    return ChatMessage(role="assistant", content=text)


def test_it_asks_in_customer_words_gives_facts_it_has_and_never_invents_one(
    mock: Environment, create: Task
) -> None:
    user = ScriptedUser(mock)
    history = [agent(GREETING)]
    first = user.say(create, history)
    assert first == (
        "Hi, I'd like to add a new task to my to-do list. The details: user_1, Important Meeting."
    )
    history += [ChatMessage(role="user", content=first)]
    assert user.say(create, [*history, agent("Could you tell me your user id?")]) == (
        "Sure, my user id is user_1."
    )
    assert user.say(create, [*history, agent("What is your email?")]) == (
        "Sorry, I don't have my email with me."  # the scenario has none: not made up
    )
    assert user.say(create, [*history, agent("Shall I create it? (yes/no)")]) == (
        "Yes, please go ahead."
    )
    assert user.say(create, [*history, agent("Hmm.")]) == first  # nothing asked: the request


def test_it_stops_once_every_gold_write_went_through_or_its_turns_run_out(
    mock: Environment, create: Task
) -> None:
    user = ScriptedUser(mock, max_turns=3)
    gold = create.agent_actions[-1]
    call = ToolCall(id="c1", name=gold.name, arguments=gold.arguments)
    opened = [agent(GREETING), ChatMessage(role="user", content="Hi, I'd like to...")]
    made = [ChatMessage(role="assistant", tool_calls=[call]),
            ChatMessage(role="tool", tool_call_id="c1", content="{}")]  # fmt: skip
    assert user.say(create, [*opened, *made, agent("Done!")]) == DONE
    failed = [made[0], made[1].model_copy(update={"error": True})]
    assert user.say(create, [*opened, *failed, agent("Done!")]) != DONE  # an error is no write
    wrong = ToolCall(id="c2", name=gold.name, arguments={**gold.arguments, "title": "Other"})
    assert user.say(create, [*opened, ChatMessage(role="assistant", tool_calls=[wrong]),
                             agent("Done!")]) != DONE  # fmt: skip
    chatter = [*opened, agent("Ok."), ChatMessage(role="user", content="x")] * 2
    assert user.say(create, [*chatter, agent("Ok.")]) == GIVE_UP
    assert is_stop(ChatMessage(role="user", content=DONE))


def test_a_question_task_asks_its_question_and_stops_once_told(mock: Environment) -> None:
    """A task with nothing to write and a fact to be told (the Proposer's `communicates`
    kind): the user asks what its scenario quotes and is done when the agent said the fact."""
    from tests.factories import todo

    task = todo(mock, "question")
    reads = task.actions[:1]
    told = task.spec.evaluation_criteria.model_copy(  # type: ignore[union-attr]
        update={"actions": reads, "communicate_info": ["Test User"]}
    )
    instructions = task.spec.user_scenario.instructions.model_copy(  # type: ignore[union-attr]
        update={"reason_for_call": 'You call to ask: "What is the name of user_1?" Be brief.'}
    )
    scenario = task.spec.user_scenario.model_copy(update={"instructions": instructions})
    question = task.model_copy(update={"spec": task.spec.model_copy(
        update={"evaluation_criteria": told, "user_scenario": scenario}
    )})  # fmt: skip
    user = ScriptedUser(mock)
    opened = [agent(GREETING)]
    assert user.say(question, opened) == "What is the name of user_1?"
    opened.append(ChatMessage(role="user", content="What is the name of user_1?"))
    assert user.say(question, [*opened, agent("Let me look.")]) != DONE
    assert user.say(question, [*opened, agent("The name is test user.")]) == DONE


@pytest.mark.anyio
async def test_a_rollout_against_it_has_no_failure_the_user_caused(
    mock: Environment, policy_url: str
) -> None:
    """The real Solver (SmolLM2) on mock tasks: every user turn is one of the script's, and
    no failure is the simulator's (its 135M counterpart caused 120 of 128 such failures)."""
    settings = Settings(
        llm={"policy": {"base_url": policy_url}},
        rollout=RolloutSettings(user="scripted", max_agent_turns=4, max_tokens=48),
    )
    runner = RolloutRunner.from_settings(settings, mock)
    assert isinstance(runner.user, ScriptedUser)
    tasks = [t for t in mock.tasks("train") if t.id.startswith("mock-create")][:1]
    try:
        groups = [await runner.run_group(task, 2) for task in tasks]
    finally:
        await runner.aclose()
    trajectories = [t for g in groups for t in g.trajectories]
    assert all(t.termination != TerminationReason.INFRA_ERROR for t in trajectories)
    for trajectory in trajectories:
        users = [m.content for m in trajectory.messages if m.role == "user" and not m.error]
        assert users, "the user never spoke"
        assert users[0] is not None
        assert users[0].startswith("Hi, I'd like to add a new task")
        if not trajectory.succeeded:
            assert simulator_fault(trajectory) is None, users


@pytest.mark.anyio
@pytest.mark.parametrize("domain", ["mock", "retail", "airline", "telecom"])
async def test_the_fidelity_probe_finds_it_in_role_on_every_check(domain: str) -> None:
    """The same probe that gates the LLM simulator (scripted agent turns, rule checks): the
    scripted user passes every check of every stage on train tasks, as `sentinel usersim
    check --scripted` reports (SmolLM2 as the simulator flips roles in most failures)."""
    env = load(named(domain))
    tasks = [t for t in env.tasks("train") if t.agent_actions][-6:]
    results = await Prober(ScriptedUser(env), env, judge=None, concurrency=4).run(tasks)
    assert len(results) == len(tasks) * 5
    failed = [(r.task_id, r.stage, r.reply, r.failures) for r in results if r.failures]
    assert failed == []
