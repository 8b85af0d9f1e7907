"""The tau2 adapter against tau2-bench itself: same tasks, same state, same reward."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime

import pytest
from tau2.data_model.simulation import SimulationRun
from tau2.data_model.simulation import TerminationReason as Tau2Termination
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation

from sentinel.envs.base import Environment, Episode
from sentinel.envs.registry import load, named
from sentinel.envs.tau2.env import to_tau2_messages, to_tau2_task
from sentinel.schemas import ChatMessage, Task, TerminationReason, ToolCall


def gold_calls(task: Task) -> list[ToolCall]:
    return [
        ToolCall(id=f"call-{i}", name=a.name, arguments=a.arguments, requestor=a.requestor)
        for i, a in enumerate(task.actions)
    ]


def run_calls(episode: Episode, calls: list[ToolCall], say: str = "") -> list[ChatMessage]:
    """A conversation that makes `calls` one by one, then says `say` and stops."""
    messages = [ChatMessage(role="user", content="Hi, I need help with my order.")]
    for call in calls:
        result = episode.step(call)
        messages.append(ChatMessage(role="assistant", tool_calls=[call]))
        messages.append(
            ChatMessage(
                role="tool", content=result.content, tool_call_id=call.id, error=result.error
            )
        )
    messages.append(ChatMessage(role="assistant", content=say or "Is there anything else?"))
    return messages


def communication(task: Task) -> str:
    criteria = task.spec.evaluation_criteria
    return "Done. " + " ".join((criteria.communicate_info or []) if criteria else [])


def tau2_reward(task: Task, messages: list[ChatMessage], termination: TerminationReason) -> float:
    now = datetime.now(UTC).isoformat()
    run = SimulationRun(
        id=uuid.uuid4().hex, task_id=task.spec.id, start_time=now, end_time=now, duration=0.0,
        termination_reason=Tau2Termination(termination.value), messages=to_tau2_messages(messages),
    )  # fmt: skip
    info = evaluate_simulation(run, to_tau2_task(task), EvaluationType.ALL, False, "retail")
    return float(info.reward)


def test_splits_and_tools(retail: Environment) -> None:
    train, test = retail.tasks("train"), retail.tasks("test")
    assert (len(train), len(test), len(retail.tasks())) == (74, 40, 114)
    assert not {t.id for t in train} & {t.id for t in test}
    assert {t.provenance.split for t in test} == {"test"}
    assert len(retail.tool_schemas) == 15
    assert "modify_pending_order_items" in retail.tool_names
    assert "Retail agent policy" in retail.policy


def test_gold_replay_of_every_train_task_scores_one(retail: Environment) -> None:
    failures = []
    for task in retail.tasks("train"):
        episode = retail.episode(task)
        messages = run_calls(episode, gold_calls(task), communication(task))
        reward = retail.reward(task, episode, messages, TerminationReason.AGENT_STOP)
        if reward.reward != 1.0:
            failures.append((task.id, reward))
    assert failures == []


# Train tasks; 13 and 105 have gold writes that fail on purpose. tau2's evaluator costs ~1.5 s.
SAMPLE = ["retail-0", "retail-13", "retail-41", "retail-88", "retail-105", "retail-110"]


@pytest.mark.parametrize("task_id", SAMPLE)
def test_reward_equals_tau2_evaluate_simulation(retail: Environment, task_id: str) -> None:
    task = next(t for t in retail.tasks("train") if t.id == task_id)
    calls = gold_calls(task)
    cases = {
        "gold": (calls, communication(task), TerminationReason.AGENT_STOP),
        "no-op": ([], "", TerminationReason.AGENT_STOP),
        "half": (calls[: len(calls) // 2], communication(task), TerminationReason.USER_STOP),
        "silent": (calls, "", TerminationReason.AGENT_STOP),
        "cut off": (calls, communication(task), TerminationReason.MAX_STEPS),
    }
    for name, (prefix, say, termination) in cases.items():
        episode = retail.episode(task)
        messages = run_calls(episode, prefix, say)
        ours = retail.reward(task, episode, messages, termination).reward
        assert ours == tau2_reward(task, messages, termination), (task.id, name)


def test_prefix_replay_rebuilds_the_state(retail: Environment) -> None:
    task = next(t for t in retail.tasks("train") if len(gold_calls(t)) >= 3)
    calls = gold_calls(task)
    live = retail.episode(task)
    hashes = []
    for call in calls:
        live.step(call)
        hashes.append(live.db_hashes())
    for t in range(len(calls)):
        assert retail.replay(task, calls[: t + 1]).db_hashes() == hashes[t]
    assert retail.replay(task, []).db_hashes() == retail.episode(task).db_hashes()


def test_bad_tool_calls_become_error_results(retail: Environment) -> None:
    episode = retail.episode(retail.tasks("train")[0])
    unknown = episode.step(ToolCall(id="x", name="delete_everything", arguments={}))
    bad_args = episode.step(ToolCall(id="y", name="get_order_details", arguments={"nope": 1}))
    missing = episode.step(ToolCall(id="z", name="get_order_details", arguments={"order_id": "#X"}))
    assert unknown.error
    assert bad_args.error
    assert missing.error
    assert "Error" in missing.content


def test_unknown_domain_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown domain 'mall'"):
        load(named("mall"))


def test_gold_hashes_cache_keeps_only_the_most_recent_tasks(
    retail: Environment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retail, "_gold", type(retail._gold)())
    monkeypatch.setattr(retail, "gold_cache_size", 2)
    first, second, third = retail.tasks("train")[:3]
    expected = retail.gold_hashes(first)
    retail.gold_hashes(second)
    assert retail.gold_hashes(first) == expected  # a hit: `first` is now the most recent
    retail.gold_hashes(third)  # evicts `second`, the least recently used

    def key(task: Task) -> str:
        return hashlib.sha256(task.spec.model_dump_json().encode()).hexdigest()

    assert list(retail._gold) == [key(first), key(third)]
    assert retail.gold_hashes(first) == expected
