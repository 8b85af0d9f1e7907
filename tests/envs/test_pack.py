"""The pack's one reading of its state rules (`StatusWalk`), and every pack's rules held to
the gold of every tau2 task as tau2 runs it."""

from __future__ import annotations

import pytest

from sentinel.envs.pack import StateRule, StatusWalk
from sentinel.envs.registry import PACKS, load, named
from sentinel.schemas import ToolCall

RULES = (
    StateRule("cancel", "order_id", "pending", after="cancelled"),
    StateRule("change", "order_id", "pending", match="contains"),
)


def test_a_write_moves_its_entity_and_a_second_breaks_the_rule() -> None:
    walk = StatusWalk(RULES, {"o1": "pending", "o2": "pending (item modified)"})
    assert walk.step("change", {"order_id": "o2"}) is None  # "contains pending"
    assert walk.step("cancel", {"order_id": "o2"}) == (
        "cancel on order o2 whose status is 'pending (item modified)'"
    )
    assert walk.step("cancel", {"order_id": "o1"}, succeeded=False) is None
    assert walk.status["o1"] == "pending"  # a failed write changes nothing
    assert walk.step("cancel", {"order_id": "o1"}) is None
    assert walk.step("cancel", {"order_id": "o1"}) is not None
    assert walk.step("cancel", {"order_id": "nowhere"}) is None  # no status known
    assert walk.step("cancel", {"order_id": 7}) is None  # not an id: the schema's business
    assert walk.step("read", {"order_id": "o1"}) is None


@pytest.mark.parametrize("domain", sorted(PACKS))
def test_the_rules_flag_no_gold_write_that_tau2_runs(domain: str) -> None:
    """Every write of every tau2 task's gold, stepped on a real episode: the rules may flag
    one only where tau2 refuses it too (retail-64's gold exchanges a pending order, and tau2
    ignores failing gold). The validator refuses proposed gold that they flag."""
    env = load(named(domain))
    wrongly_flagged = {}
    for task in env.tasks():
        if task.spec.initial_state is not None:  # statuses not the database's own
            continue
        episode, walk = env.episode(task), StatusWalk(env.pack.rules, env.entities.status)
        for i, action in enumerate(task.agent_actions):
            call = ToolCall(id=f"g{i}", name=action.name, arguments=action.arguments)
            result = episode.step(call)
            if (broken := walk.step(action.name, action.arguments, not result.error)) and (
                not result.error
            ):
                wrongly_flagged[task.id] = broken
    assert wrongly_flagged == {}
