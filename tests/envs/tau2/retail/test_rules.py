"""Retail's state rules against tau2's own retail tools: the table names real write tools and
arguments, and for every order status a real episode can reach, a rule allows a write exactly
when tau2's tool does not refuse it on the status, and leaves the status tau2 leaves."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sentinel.envs.base import Environment, Episode
from sentinel.envs.pack import StateRule
from sentinel.envs.tau2.retail import PACK
from sentinel.envs.tau2.retail.rules import RULES
from sentinel.schemas import Action, Task, ToolCall


class Reached:
    """An order in a status: a task and the gold calls that put the order there."""

    def __init__(self, task: Task, calls: list[Action], order_id: str) -> None:
        self.task, self.calls, self.order_id = task, calls, order_id

    def episode(self, env: Environment) -> Episode:
        episode = env.episode(self.task)
        for a in self.calls:
            episode.step(ToolCall(id=a.action_id, name=a.name, arguments=a.arguments))
        return episode


def _status(episode: Episode, order_id: str) -> str:
    """The order's status in the episode, as tau2's read tool gives it."""
    call = ToolCall(id="s", name="get_order_details", arguments={"order_id": order_id})
    result = episode.step(call)
    assert not result.error, result.content
    return str(json.loads(result.content)["status"])


@pytest.fixture(scope="module")
def reached(retail: Environment) -> dict[str, Reached]:
    """Every status an order can be in: the database's, and those the rules' writes leave
    (each made by replaying a train task's gold up to its first such write)."""
    anchor = retail.tasks("train")[0]
    found: dict[str, Reached] = {}
    for oid, order in retail.database["orders"].items():
        found.setdefault(order["status"], Reached(anchor, [], oid))
    for rule in RULES:
        if rule.after is None or rule.after in found:
            continue
        for task in retail.tasks("train"):
            actions = [a for a in task.actions if a.requestor == "assistant"]
            at = next((i for i, a in enumerate(actions) if a.name == rule.tool), None)
            if at is None:
                continue
            candidate = Reached(task, actions[: at + 1], actions[at].arguments[rule.argument])
            episode = candidate.episode(retail)
            if _status(episode, candidate.order_id) == rule.after:
                found[rule.after] = candidate
                break
        assert rule.after in found, f"no train task's {rule.tool} leaves {rule.after!r}"
    return found


def _probe(env: Environment, rule: StateRule, order_id: str) -> dict[str, Any]:
    """The rule's tool called on `order_id`, its other arguments placeholders of the right
    type: tau2 checks the status first, so a placeholder fails only after that check."""
    schema = next(s for s in env.tool_schemas if s["function"]["name"] == rule.tool)
    properties = schema["function"]["parameters"]["properties"]
    arguments: dict[str, Any] = {
        name: ["x"] if p.get("type") == "array" else "x" for name, p in properties.items()
    }
    return arguments | {rule.argument: order_id}


def _problems(env: Environment, rules: tuple[StateRule, ...]) -> list[str]:
    """What is wrong with a table of state rules for `env`."""
    schemas = {s["function"]["name"]: s["function"]["parameters"] for s in env.tool_schemas}
    statuses = {o["status"] for o in env.database["orders"].values()}
    tools = [r.tool for r in rules]
    problems = [f"{t} has two rules" for t in set(tools) if tools.count(t) > 1]
    for r in rules:
        if r.tool not in env.write_tools:
            problems.append(f"{r.tool} is no write tool")
        elif r.argument not in schemas[r.tool]["required"]:
            problems.append(f"{r.tool} takes no {r.argument}")
        if not any(r.allows(s) for s in statuses):
            problems.append(f"{r.tool}: no order could ever fit {r.status!r}")
    return problems


def test_every_rule_names_a_write_tool_and_its_argument(retail: Environment) -> None:
    assert _problems(retail, RULES) == []
    assert all(PACK.rule(r.tool) is r for r in RULES)


def test_a_typo_in_the_table_fails(retail: Environment) -> None:
    typos = (
        StateRule("cancel_pending_orders", "order_id", "pending"),
        StateRule("modify_pending_order_items", "order", "pending"),
        StateRule("return_delivered_order_items", "order_id", "deliverd"),
        StateRule("get_order_details", "order_id", "pending"),
        RULES[0],
        RULES[0],
    )
    assert _problems(retail, typos) == [
        "cancel_pending_order has two rules",
        "cancel_pending_orders is no write tool",
        "modify_pending_order_items takes no order",
        "return_delivered_order_items: no order could ever fit 'deliverd'",
        "get_order_details is no write tool",
    ]


def test_a_rule_allows_what_tau2_allows_in_every_reachable_status(
    retail: Environment, reached: dict[str, Reached]
) -> None:
    assert {"pending", "pending (item modified)", "delivered", "processed"} <= set(reached)
    verdicts: dict[str, set[bool]] = {r.tool: set() for r in RULES}
    for status, where in reached.items():
        episode = where.episode(retail)  # one a status: a refused probe changes nothing
        for rule in RULES:
            assert _status(episode, where.order_id) == status
            arguments = _probe(retail, rule, where.order_id)
            result = episode.step(ToolCall(id="p", name=rule.tool, arguments=arguments))
            refused = result.error and "Non-" in result.content and "cannot be" in result.content
            verdicts[rule.tool].add(not refused)
            assert rule.allows(status) == (not refused), (rule.tool, status, result.content)
            if not result.error:  # a write that went through: the status the rule says
                assert _status(episode, where.order_id) == (rule.after or status)
                episode = where.episode(retail)
    assert all(v == {True, False} for v in verdicts.values()), verdicts  # both were seen
