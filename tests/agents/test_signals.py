"""Deterministic failure signals on real tau2 retail tasks and hand-built trajectories."""

from __future__ import annotations

import pytest

from sentinel.agents.signals import failure_signals, first_wrong_step, primary_category
from sentinel.envs.base import Environment
from sentinel.schemas import (
    ChatMessage,
    FailureCategory,
    RewardBreakdown,
    Task,
    TerminationReason,
    ToolCall,
    Trajectory,
)


@pytest.fixture(scope="module")
def cancel_task(retail: Environment) -> Task:
    """A train task whose only write cancels a pending order."""
    for task in retail.tasks("train"):
        actions = task.actions
        writes = [a for a in actions if a.name in retail.write_tools]
        if [a.name for a in writes] == ["cancel_pending_order"]:
            return task
    raise AssertionError("no cancellation task in retail train")


def conversation(
    task: Task, *, confirm: bool = True, change: dict[str, object] | None = None, drop: str = ""
) -> list[ChatMessage]:
    """The gold actions as a conversation: the user asks, the agent acts, with a yes before
    every write (unless `confirm` is False)."""
    messages = [ChatMessage(role="user", content="Hi, I need help with an order.")]
    for i, action in enumerate(task.actions):
        if action.name == drop:
            continue
        arguments = (
            {**action.arguments, **(change or {})}
            if action.name.startswith("cancel")
            else action.arguments
        )
        if action.name.startswith("cancel") and confirm:
            messages.append(ChatMessage(role="user", content="Yes, please go ahead."))
        call = ToolCall(id=f"c{i}", name=action.name, arguments=arguments)
        messages.append(ChatMessage(role="assistant", tool_calls=[call]))
        messages.append(ChatMessage(role="tool", content="{}", tool_call_id=f"c{i}"))
    return messages


def trajectory(
    messages: list[ChatMessage],
    termination: TerminationReason = TerminationReason.AGENT_STOP,
    missing: list[str] | None = None,
    malformed: int = 0,
) -> Trajectory:
    return Trajectory(
        task_id="t", domain="retail", policy_version=0, policy_model="m", messages=messages,
        termination=termination, malformed_turns=malformed,
        reward=RewardBreakdown(reward=0.0, missing_communication=missing or []),
    )  # fmt: skip


def categories(signals: list) -> list[FailureCategory]:  # type: ignore[type-arg]
    return [s.category for s in signals]


def test_the_gold_conversation_has_no_signal(retail: Environment, cancel_task: Task) -> None:
    assert failure_signals(cancel_task, trajectory(conversation(cancel_task)), retail) == []


def test_a_dropped_write_is_a_missing_action(retail: Environment, cancel_task: Task) -> None:
    messages = conversation(cancel_task, drop="cancel_pending_order")
    [signal] = failure_signals(cancel_task, trajectory(messages), retail)
    assert signal.category == FailureCategory.MISSING_ACTION
    assert signal.step is None
    assert signal.tool == "cancel_pending_order"


def test_another_reason_is_wrong_arguments_naming_it(
    retail: Environment, cancel_task: Task
) -> None:
    messages = conversation(cancel_task, change={"reason": "too expensive"})
    [signal] = failure_signals(cancel_task, trajectory(messages), retail)
    assert signal.category == FailureCategory.WRONG_ARGUMENTS
    assert "reason: expected" in signal.detail
    assert '"too expensive"' in signal.detail
    assert messages[signal.step or 0].tool_calls[0].name == "cancel_pending_order"


def test_unknown_and_foreign_orders_are_wrong_entities(
    retail: Environment, cancel_task: Task
) -> None:
    missing = conversation(cancel_task, change={"order_id": "#W0000000"})
    found = failure_signals(cancel_task, trajectory(missing), retail)
    assert primary_category(found) == FailureCategory.WRONG_ENTITY
    assert any("does not exist" in s.detail for s in found)
    gold_order = next(
        a.arguments["order_id"] for a in cancel_task.actions if a.name == "cancel_pending_order"
    )
    owner = retail.database["orders"][gold_order]["user_id"]
    other = next(
        i for i, o in retail.database["orders"].items()
        if o["user_id"] != owner and o["status"] == "pending"
    )  # fmt: skip
    foreign = conversation(cancel_task, change={"order_id": other})
    found = failure_signals(cancel_task, trajectory(foreign), retail)
    assert any("belongs to" in s.detail and other in s.detail for s in found)


def test_a_write_without_a_yes_misses_confirmation(retail: Environment, cancel_task: Task) -> None:
    messages = conversation(cancel_task, confirm=False)
    [signal] = failure_signals(cancel_task, trajectory(messages), retail)
    assert signal.category == FailureCategory.MISSING_CONFIRMATION


def test_cancelling_a_delivered_order_violates_the_policy(
    retail: Environment, cancel_task: Task
) -> None:
    gold_order = next(
        a.arguments["order_id"] for a in cancel_task.actions if a.name == "cancel_pending_order"
    )
    delivered = next(i for i, o in retail.database["orders"].items() if o["status"] == "delivered")
    messages = conversation(cancel_task, change={"order_id": delivered})
    found = failure_signals(cancel_task, trajectory(messages), retail)
    assert FailureCategory.POLICY_VIOLATION in categories(found)
    twice = conversation(cancel_task)
    twice += twice[-3:]  # the same cancellation again: the order is cancelled by then
    found = failure_signals(cancel_task, trajectory(twice), retail)
    assert [s.detail for s in found if s.category == FailureCategory.POLICY_VIOLATION] == [
        f"cancel_pending_order on order {gold_order} whose status is 'cancelled'"
    ]


def test_outcome_signals_and_their_order(retail: Environment, cancel_task: Task) -> None:
    messages = conversation(cancel_task, confirm=False)
    messages.insert(1, ChatMessage(role="assistant", content="<garbage", error=True))
    found = failure_signals(
        cancel_task,
        trajectory(messages, TerminationReason.MAX_STEPS, missing=["10.50"], malformed=1),
        retail,
    )
    assert categories(found) == [
        FailureCategory.MALFORMED_OUTPUT,
        FailureCategory.MISSING_CONFIRMATION,
        FailureCategory.UNFINISHED,
        FailureCategory.MISSING_COMMUNICATION,
    ]
    assert first_wrong_step(found) == 1
    assert primary_category(found) == FailureCategory.MISSING_CONFIRMATION
    assert primary_category([]) == FailureCategory.OTHER


def test_writes_tau2_allows_after_an_item_change_are_no_violation(retail: Environment) -> None:
    """Issue 18: the signals once required a status of exactly "pending" for every modify
    tool, while tau2 (and the grounder) accept "pending (item modified)" for the address and
    the payment. Both now read the pack's one table: on an order whose items a real episode
    changed, the writes tau2 lets past its status check are not flagged, the cancellation
    tau2 refuses is."""
    orders, users = retail.database["orders"], retail.database["users"]
    task, order_id, modify = next(
        (t, a.arguments["order_id"], i)
        for t in retail.tasks("train")
        for i, a in enumerate(t.actions)
        if a.name == "modify_pending_order_items"
        and len(users[orders[a.arguments["order_id"]]["user_id"]]["payment_methods"]) > 1
    )  # an item change by a user who has another way to pay
    order = orders[order_id]
    user = users[order["user_id"]]
    paid_with = order["payment_history"][0]["payment_method_id"]
    other_method = next(m for m in user["payment_methods"] if m != paid_with)
    address = {
        k: user["address"][k] for k in ("address1", "address2", "city", "state", "country", "zip")
    }
    calls = [(a.name, a.arguments) for a in task.actions[: modify + 1]] + [
        ("get_order_details", {"order_id": order_id}),
        ("modify_pending_order_address", {"order_id": order_id, **address}),
        ("modify_pending_order_payment", {"order_id": order_id, "payment_method_id": other_method}),
        ("cancel_pending_order", {"order_id": order_id, "reason": "no longer needed"}),
    ]
    episode = retail.episode(task)
    messages = [ChatMessage(role="user", content="Hi, I need help with an order.")]
    results = {}
    for i, (name, arguments) in enumerate(calls):
        call = ToolCall(id=f"c{i}", name=name, arguments=arguments)
        result = episode.step(call)
        results[name] = result
        messages += [
            ChatMessage(role="user", content="Yes, please go ahead."),
            ChatMessage(role="assistant", tool_calls=[call]),
            ChatMessage(
                role="tool", content=result.content, tool_call_id=call.id, error=result.error
            ),
        ]
    assert '"status": "pending (item modified)"' in results["get_order_details"].content
    assert not results["modify_pending_order_items"].error
    assert not results["modify_pending_order_address"].error  # tau2 accepts it
    payment = results["modify_pending_order_payment"]  # past the status check, then refused:
    assert payment.error
    assert "exactly one payment" in payment.content  # the item change paid a difference
    assert "Non-pending" not in payment.content
    assert results["cancel_pending_order"].content == "Error: Non-pending order cannot be cancelled"
    violations = [
        s for s in failure_signals(task, trajectory(messages), retail)
        if s.category == FailureCategory.POLICY_VIOLATION
    ]  # fmt: skip
    assert [(s.tool, s.detail) for s in violations] == [
        (
            "cancel_pending_order",
            f"cancel_pending_order on order {order_id} whose status is 'pending (item modified)'",
        )
    ]
    assert messages[violations[0].step or 0].tool_calls[0].name == "cancel_pending_order"
