"""Grounding on the real airline database: users that fit each write tool (never a test
task's), actions schemas that admit only grounded ids, and drafts that run."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from sentinel.envs.base import Environment
from sentinel.envs.grounding import actions_schema, grounder
from sentinel.envs.pack import GroundingUnsupported
from sentinel.envs.tau2.airline.grounder import AirlineGrounder, Grounding
from sentinel.schemas import ToolCall
from tests.envs.tau2.airline.helpers import first_write

WRITES = [
    "book_reservation",
    "cancel_reservation",
    "send_certificate",
    "update_reservation_baggages",
    "update_reservation_flights",
    "update_reservation_passengers",
]
SEEDS = 5  # groundings per write tool whose first-choice draft must run


def _airline_grounder(env: Environment) -> AirlineGrounder:
    chosen = grounder(env)
    assert isinstance(chosen, AirlineGrounder)
    return chosen


def ground(env: Environment, tools: list[str], rng: random.Random) -> Grounding:
    """The generic `ground`, typed as airline's grounding."""
    grounding = _airline_grounder(env).ground(tools, rng)
    assert isinstance(grounding, Grounding)
    return grounding


def _strings(schema: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(argument name, allowed value) for every enum in a schema."""
    if isinstance(schema, dict):
        for value in schema.get("enum", []):
            if isinstance(value, str):
                yield key, value
        for name, sub in schema.items():
            inner = name if name not in ("properties", "items", "anyOf", "prefixItems") else key
            yield from _strings(sub, inner)
    elif isinstance(schema, list):
        for sub in schema:
            yield from _strings(sub, key)


def test_the_write_tools_are_airlines(airline: Environment) -> None:
    assert set(WRITES) == airline.write_tools


@pytest.mark.parametrize("tool", WRITES)
def test_ground_is_deterministic_and_never_uses_a_test_users_entities(
    airline: Environment, tool: str
) -> None:
    held_out = _airline_grounder(airline).held_out
    assert "anya_garcia_5901" in held_out  # a test task's user (airline-40's scenario)
    first = [ground(airline, [tool], random.Random(seed)) for seed in range(4)]
    again = [ground(airline, [tool], random.Random(seed)) for seed in range(4)]
    assert first == again
    assert len({g.user.user_id for g in first}) > 1  # the rng picks among users
    db = airline.database
    for g in first:
        assert g.user.user_id not in held_out
        assert {r.reservation_id for r in g.reservations} <= set(
            db["users"][g.user.user_id]["reservations"]
        )
        assert g.moves
        assert all(m.tool == tool for m in g.moves)
        assert g.identity() == f"Your user id is {g.user.user_id}."
        assert g.user.user_id in g.describe()


@pytest.mark.parametrize("tool", WRITES)
def test_every_id_in_the_schema_exists_and_belongs_to_the_user(
    airline: Environment, tool: str
) -> None:
    g = ground(airline, [tool], random.Random(7))
    schema = actions_schema(airline, g, [tool])
    db, owner = airline.database, airline.entities.owner
    for name, value in _strings(schema):
        if name.endswith("_id") and name != "user_id":
            assert owner[value] == g.user.user_id, (name, value)
        elif name == "user_id":
            assert value == g.user.user_id
        elif name == "flight_number":
            assert value in db["flights"]


@pytest.mark.parametrize("tool", WRITES)
def test_first_choice_drafts_run_and_change_the_database(airline: Environment, tool: str) -> None:
    task = airline.tasks("train")[0]
    episode = airline.episode(task)  # one: each seed grounds another user
    for seed in range(SEEDS):
        if tool == "book_reservation":  # tau2 has three new reservation ids per episode
            episode = airline.episode(task)
        _, call = first_write(airline, tool, seed)
        assert call["name"] == tool
        before = episode.db_hashes()
        result = episode.step(ToolCall(id="0", name=tool, arguments=call["arguments"]))
        assert not result.error, (seed, call, result.content)
        assert episode.db_hashes() != before


def test_the_schema_refuses_ids_outside_the_grounding(airline: Environment) -> None:
    g = ground(airline, ["cancel_reservation", "update_reservation_flights"], random.Random(1))
    schema = actions_schema(airline, g, ["cancel_reservation", "update_reservation_flights"])
    check = jsonschema.Draft202012Validator(schema)
    cancel = next(m for m in g.moves if m.tool == "cancel_reservation")
    change = next(m for m in g.moves if m.tool == "update_reservation_flights")
    good = [{"name": m.tool, "arguments": m.arguments} for m in (cancel, change)]
    assert check.is_valid(good)
    other = next(r for r in airline.database["reservations"] if r not in g.user.reservations)
    stranger = [{"name": "cancel_reservation", "arguments": {"reservation_id": other}}]
    extra = [
        {**good[1], "arguments": {**change.arguments, "flights": change.arguments["flights"] * 2}}
    ]
    certificate = {
        "payment_id": "certificate_1",
        **{k: v for k, v in change.arguments.items() if k != "payment_id"},
    }
    for bad in (stranger, extra, [{"name": change.tool, "arguments": certificate}], []):
        assert not check.is_valid(bad), bad


def test_no_user_fits_and_foreign_groundings_are_refused(airline: Environment) -> None:
    chosen = _airline_grounder(airline)
    held = sorted(chosen.held_out)
    assert held
    assert all(u not in chosen.fitting("cancel_reservation") for u in held)
    g = ground(airline, ["cancel_reservation"], random.Random(0))
    with pytest.raises(GroundingUnsupported, match="not an airline grounding"):
        chosen.actions_schema(object(), ["cancel_reservation"], 2, False)  # type: ignore[arg-type]
    assert isinstance(g, Grounding)
    chosen._fit["cancel_reservation"] = []  # as if every user with one were a test user
    try:
        with pytest.raises(GroundingUnsupported, match="no airline user"):
            chosen.ground(["cancel_reservation"], random.Random(0))
    finally:
        del chosen._fit["cancel_reservation"]
