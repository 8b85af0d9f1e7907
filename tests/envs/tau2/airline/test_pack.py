"""The airline pack's knowledge against real tau2 airline: its state rules, how its users
talk, and how its database's ids nest."""

from __future__ import annotations

import json

from sentinel.agents.signals import failure_signals
from sentinel.envs.base import Environment
from sentinel.envs.registry import pack
from sentinel.envs.tau2.airline.phrasing import RESERVATION_ID
from sentinel.envs.tau2.airline.rules import ACTIVE, CANCELLED, RULES
from sentinel.schemas import (
    ChatMessage,
    FailureCategory,
    RewardBreakdown,
    TerminationReason,
    ToolCall,
    Trajectory,
    UserInstructions,
)
from sentinel.usersim.scenario import scenario_of


def _parameters(env: Environment, tool: str) -> set[str]:
    schema = next(s for s in env.tool_schemas if s["function"]["name"] == tool)
    return set(schema["function"]["parameters"]["properties"])


def test_the_rules_name_real_write_tools_and_their_arguments(airline: Environment) -> None:
    assert pack("airline").rules == RULES
    for rule in RULES:
        assert rule.tool in airline.write_tools
        assert rule.argument in _parameters(airline, rule.tool)
    # every write on one reservation has its rule
    on_reservations = {
        t for t in airline.write_tools if "reservation_id" in _parameters(airline, t)
    }
    assert on_reservations == {r.tool for r in RULES}


def test_a_cancelled_reservation_allows_no_write_and_cancel_leaves_the_rules_status(
    airline: Environment,
) -> None:
    # tau2 stores an active reservation's status as null: the pack's ACTIVE
    assert {r.get("status") for r in airline.database["reservations"].values()} == {None}
    assert all(r.allows(ACTIVE) and not r.allows(CANCELLED) for r in RULES)
    cancel = pack("airline").rule("cancel_reservation")
    assert cancel is not None
    episode = airline.episode(airline.tasks("train")[0])
    reservation = next(iter(airline.database["reservations"]))
    result = episode.step(
        ToolCall(id="0", name="cancel_reservation", arguments={"reservation_id": reservation})
    )
    assert not result.error
    assert json.loads(result.content)["status"] == cancel.after


def test_payment_methods_are_entities_owned_by_their_user(airline: Environment) -> None:
    entities = airline.entities
    user_id, user = next(iter(airline.database["users"].items()))
    for method in user["payment_methods"]:
        assert method in entities.ids
        assert entities.owner[method] == user_id
    reservation = next(iter(airline.database["reservations"].values()))
    assert entities.owner[reservation["reservation_id"]] == reservation["user_id"]


def test_every_scenario_gives_a_user_id_the_phrasing_finds(airline: Environment) -> None:
    phrasing = pack("airline").phrasing
    assert set(phrasing.openings) == airline.write_tools
    for task in airline.tasks():
        instructions = task.spec.user_scenario.instructions
        assert isinstance(instructions, UserInstructions)
        user_id = scenario_of(task).user_id
        assert user_id in airline.database["users"], (task.id, instructions.known_info)
    # a withheld fact falls back to one no scenario gives
    assert phrasing.kinds[-1].name == "email"


def test_reservation_ids_are_recognised_and_flight_numbers_are_not(airline: Environment) -> None:
    reservations = airline.database["reservations"]
    assert all(RESERVATION_ID.fullmatch(r) for r in reservations)
    assert not any(RESERVATION_ID.search(f) for f in airline.database["flights"])
    kind = next(k for k in pack("airline").phrasing.kinds if k.name == "reservation id")
    assert kind.mention.search("You do not remember the reservation id.")


def test_a_second_cancel_of_one_reservation_is_a_policy_violation(airline: Environment) -> None:
    """Live reservations have a null status, which the pack names: without it the signals
    would see no status and let the second cancel pass."""
    reservation = next(iter(airline.database["reservations"]))
    assert airline.entities.status[reservation] == ACTIVE
    task = airline.tasks("train")[0]
    arguments = {"reservation_id": reservation}
    messages = [ChatMessage(role="user", content="Cancel it, yes please.")]
    for i in range(2):
        call = ToolCall(id=f"c{i}", name="cancel_reservation", arguments=arguments)
        messages += [
            ChatMessage(role="assistant", tool_calls=[call]),
            ChatMessage(role="tool", content="{}", tool_call_id=f"c{i}"),
        ]
    trajectory = Trajectory(
        task_id=task.id, domain="airline", policy_version=0, policy_model="m",
        messages=messages, termination=TerminationReason.AGENT_STOP,
        reward=RewardBreakdown(reward=0.0),
    )  # fmt: skip
    violations = [
        s for s in failure_signals(task, trajectory, airline)
        if s.category == FailureCategory.POLICY_VIOLATION and s.tool == "cancel_reservation"
    ]  # fmt: skip
    assert [s.step for s in violations] == [3]
    assert CANCELLED in violations[0].detail
