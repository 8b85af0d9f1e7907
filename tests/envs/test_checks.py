"""Per-instance checkers: derived from the gold run's diff, failing on the initial state and
on near misses, on tau2's mock and retail domains; and what a hostile check can and cannot do."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sentinel.envs import checks
from sentinel.envs.base import Environment
from sentinel.envs.replay import ReplayRequest, run_replay
from sentinel.schemas import Action, StateCheck, Task, TerminationReason
from sentinel.schemas.task import MAX_CHECKS
from tests.factories import todo

BEFORE = {
    "orders": {"o1": {"status": "pending", "items": [{"id": "a", "price": 1}]}},
    "users": {"u1": {"name": "Ann", "cards": ["c1", "c2"]}},
    "gone": {"x": 1},
}
AFTER = {
    "orders": {
        "o1": {"status": "cancelled", "items": [{"id": "a", "price": 2}]},
        "o2": {"status": "pending", "items": []},
    },
    "users": {"u1": {"name": "Ann", "cards": ["c1"]}},
}


def described(found: list[StateCheck]) -> list[str]:
    return [c.describe() for c in found]


def test_one_check_per_changed_value_as_deep_as_the_change() -> None:
    found = checks.derive((BEFORE, None), (AFTER, None))
    assert described(found) == [
        'orders.o1.status == "cancelled"',
        "orders.o1.items.0.price == 2",  # a list of the same length: per element
        'orders.o2 == {"status": "pending", "items": []}',  # a new record, whole
        'users.u1.cards == ["c1"]',  # a list that changed length: whole
        "gone absent",
    ]
    assert not checks.failing(found, (AFTER, None))
    assert len(checks.failing(found, (BEFORE, None))) == len(found)
    assert checks.passed(found, (BEFORE, None)) == 0.0


def test_a_task_s_own_checks_come_first_and_are_not_repeated() -> None:
    own = StateCheck(path=["orders", "o1", "status"], value="cancelled")
    found = checks.derive((BEFORE, None), (AFTER, None), [own])
    assert found[0] is own
    assert described(found).count('orders.o1.status == "cancelled"') == 1


def test_a_large_new_record_is_checked_field_by_field() -> None:
    big = {"notes": "x" * 3000, "more": "y" * 3000}
    found = checks.derive(({}, None), ({"t": {"r": big}}, None))
    assert [c.path for c in found] == [["t", "r", "notes"], ["t", "r", "more"]]


def test_derived_checks_are_capped() -> None:
    after = {"t": {f"k{i}": i for i in range(100)}}
    assert len(checks.derive(({"t": {}}, None), (after, None))) == MAX_CHECKS


@pytest.mark.parametrize(
    "check",
    [
        {"path": ["a"] * 9, "value": 1},  # too deep
        {"path": [], "value": 1},
        {"path": ["a" * 201], "value": 1},
        {"path": ["a"], "value": "x" * 5000},  # an expected value too large to carry
        {"path": ["a"], "op": "exec", "value": "import os"},  # no operation but the two
        {"path": ["a"], "value": 1, "code": "print(1)"},  # nothing else
    ],
)
def test_hostile_checks_are_refused_by_the_schema(check: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        StateCheck.model_validate(check)


def test_a_check_that_points_anywhere_is_false_not_a_crash() -> None:
    state = (BEFORE, None)
    for path in (["orders", "o1", "status", "deeper"], ["users", "u1", "cards", "7"],
                 ["users", "u1", "cards", "-1"], ["nothing"]):  # fmt: skip
        assert not checks.holds(StateCheck(path=path, value="pending"), state)
    assert checks.holds(StateCheck(path=["users", "u1", "cards", "1"], value="c2"), state)
    assert not checks.holds(StateCheck(side="user", path=["a"], value=None), state)  # no user db
    assert checks.holds(StateCheck(side="user", path=["a"], op="absent"), state)


def test_too_many_checks_on_a_task_are_refused(mock: Environment) -> None:
    task = todo(mock, "many")
    many = [{"path": [f"k{i}"], "value": i} for i in range(MAX_CHECKS + 1)]
    with pytest.raises(ValidationError):
        Task.model_validate({**task.model_dump(), "checks": many})


def _status_task(mock: Environment) -> Task:
    """Mark the mock domain's to-do done: its status is an enum, so there are near misses."""
    task = todo(mock, "done")
    [find, _] = task.actions
    done = Action(
        action_id="1", name="update_task_status",
        arguments={"task_id": "task_1", "status": "completed"},
    )  # fmt: skip
    criteria = task.spec.evaluation_criteria.model_copy(update={"actions": [find, done]})  # type: ignore[union-attr]
    return task.model_copy(
        update={"spec": task.spec.model_copy(update={"evaluation_criteria": criteria})}
    )


def test_the_replay_derives_checks_that_fail_before_and_on_each_near_miss(
    mock: Environment,
) -> None:
    task = _status_task(mock)
    outcome = run_replay(ReplayRequest(domain="mock", task=task), {"mock": mock})
    assert described(outcome.checks) == ['tasks.task_1.status == "completed"']
    assert outcome.checks_hold_before is False
    assert outcome.check_failures == []
    assert [m.label for m in outcome.near_misses] == [
        '1:update_task_status.status: "completed" -> "pending"'
    ]
    assert all(m.caught for m in outcome.near_misses)


def test_a_task_s_own_check_is_evaluated_on_the_gold_run(mock: Environment) -> None:
    task = _status_task(mock)
    wrong = StateCheck(path=["tasks", "task_1", "status"], value="pending")
    outcome = run_replay(
        ReplayRequest(domain="mock", task=task.model_copy(update={"checks": [wrong]})),
        {"mock": mock},
    )
    assert outcome.check_failures == ['tasks.task_1.status == "pending"']


def test_a_miss_the_diff_lets_through_gets_a_check_of_its_own(retail: Environment) -> None:
    """retail-22 changes one user's address twice: the same change made to a sibling user
    first leaves the target user's final address right, so the diff's checks pass it; the
    hash does not, and neither do the hardened checks."""
    [task] = [t for t in retail.tasks("train") if t.id == "retail-22"]
    outcome = run_replay(ReplayRequest(domain="retail", task=task), {"retail": retail})
    missed = [m.label for m in outcome.near_misses if not m.caught]
    assert any("modify_user_address.user_id" in label for label in missed)
    episode = retail.episode(task)
    derived = checks.derive(
        episode.db_state(), retail.replay(task, checks.gold_calls(task)).db_state()
    )
    assert len(outcome.checks) > len(derived)
    siblings = checks.Siblings(retail.database, retail.entities)
    gold = retail.replay(task, checks.gold_calls(task))
    again = checks.discriminate(
        task, retail, siblings, outcome.checks, (gold.db_state(), gold.db_hashes())
    )
    assert again.tried
    assert all(caught for _, caught in again.tried)


def test_siblings_are_the_nearest_ids_not_any(retail: Environment) -> None:
    """The nearest sibling of a payment method is another of its owner's; of an order's
    item, another item of the same order (farther ones follow)."""
    siblings = checks.Siblings(retail.database, retail.entities)
    users = retail.database["users"]
    owner = next(u for u in users.values() if len(u["payment_methods"]) >= 2)
    [first, *others] = list(owner["payment_methods"])
    assert siblings.of(first, set())[0] in others
    order_id, order = next(
        (k, o) for k, o in retail.database["orders"].items() if len(o["items"]) >= 2
    )
    items = [i["item_id"] for i in order["items"]]
    assert siblings.of(items[0], {order_id})[0] in items[1:]


def test_a_task_s_checks_give_partial_credit_for_the_state_reached(mock: Environment) -> None:
    """Of two checks, the one the run left true holds: half, and partial credit says so
    where the calls alone (none in the messages) would say nothing."""
    task = _status_task(mock)
    kept = StateCheck(path=["tasks", "task_1", "title"], value="Test task")
    checked = task.model_copy(update={"checks": [*_derived(mock, task), kept]})
    stop = TerminationReason.AGENT_STOP
    reads = mock.replay(checked, checks.gold_calls(checked)[:1])
    reward = mock.reward(checked, reads, [], stop)
    assert (reward.reward, reward.checks, reward.partial) == (0.0, 0.5, 0.5)
    unended = mock.reward(checked, reads, [], TerminationReason.MAX_STEPS)
    assert (unended.reward, unended.checks, unended.partial) == (0.0, 0.5, 0.5)
    done = mock.replay(checked, checks.gold_calls(checked))
    assert mock.reward(checked, done, [], stop).checks == 1.0
    assert mock.reward(task, done, [], stop).checks is None


def _derived(env: Environment, task: Task) -> list[StateCheck]:
    return run_replay(ReplayRequest(domain=env.name, task=task), {env.name: env}).checks
