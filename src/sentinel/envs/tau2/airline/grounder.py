"""Grounding on tau2's airline database: a real user whose reservations fit the tools, and
actions schemas whose writes are the moves airline's policy allows (`airline.policy`).

`ground` samples one user (never one of a test-split task's users) with a move for every
write tool asked for; `Grounding.describe` shows their profile, reservations and moves
(for flight changes, real alternative flights on the same route and day). `actions_schema`
makes each move one branch whose ids, flights, passengers and amounts are fixed and whose
payment method is an enum of those the write accepts, so even a tiny model under
constrained decoding writes gold actions that run and keep to the policy. `mutate` moves a
seed train task onto another user (`airline.mutation`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

from sentinel.envs.base import Environment
from sentinel.envs.episodes import EnvPool
from sentinel.envs.grounding import branch, empty, enum, obj, text
from sentinel.envs.pack import Grounding as AnyGrounding
from sentinel.envs.pack import GroundingUnsupported
from sentinel.envs.tau2.airline.phrasing import USER_ID
from sentinel.envs.tau2.airline.policy import (
    AirlineData,
    GroundedReservation,
    GroundedUser,
    Move,
)
from sentinel.schemas import Action, Task, UserInstructions
from sentinel.schemas.message import Strict

JSON = dict[str, Any]
MAX_RESERVATIONS = 3  # reservations shown per grounding, unless the moves need more
MAX_MOVES = 4  # moves offered per write tool
READS = (  # what an agent needs to find the user, reservations and flights
    "get_user_details",
    "get_reservation_details",
    "search_direct_flight",
    "get_flight_status",
)


class Grounding(Strict):
    """The real entities one proposal may use, sampled for `tools`."""

    domain: str
    tools: list[str]
    user: GroundedUser
    reservations: list[GroundedReservation]
    moves: list[Move]  # the writes the gold may make

    def describe(self) -> str:
        u = self.user
        lines = [
            f"User {u.name} (user id {u.user_id}), {u.membership} member, email {u.email}",
            "Payment methods: " + "; ".join(m.text() for m in u.payment_methods),
            "Saved passengers: " + ("; ".join(p.text() for p in u.saved_passengers) or "none"),
            *(r.text() for r in self.reservations),
        ]
        if self.moves:
            lines.append("Writes the policy allows here:")
            lines += [f"  {m.text()}" for m in self.moves]
        return "\n".join(lines)

    def identity(self) -> str:
        return f"Your user id is {self.user.user_id}."


class AirlineGrounder:
    def __init__(self, env: Environment) -> None:
        self.env = env
        self.data = AirlineData(env.database)
        self.held_out = self._test_users()
        self._fit: dict[str, list[str]] = {}

    def _test_users(self) -> frozenset[str]:
        """Users of test tasks (in their actions or scenario): never used."""
        users: set[str] = set()
        for task in self.env.tasks("test"):
            users |= self.actors(task.actions)
            users |= set(USER_ID.findall(_scenario_text(task)))
        return frozenset(users)

    def actors(self, actions: Iterable[Action]) -> set[str]:
        """The users a task's actions touch ("" for a reservation that does not exist)."""
        users: set[str] = set()
        for a in actions:
            if isinstance(uid := a.arguments.get("user_id"), str):
                users.add(uid)
            if isinstance(rid := a.arguments.get("reservation_id"), str):
                users.add(self.data.reservations.get(rid, {}).get("user_id", ""))
        return users

    def fitting(self, tool: str) -> list[str]:
        """Usable users with a move of `tool`, found once per tool."""
        if tool not in self._fit:
            self._fit[tool] = [
                uid for uid in sorted(self.data.users)
                if uid not in self.held_out and self.data.moves(uid, tool)
            ]  # fmt: skip
        return self._fit[tool]

    def ground(self, tools: Sequence[str], rng: random.Random) -> Grounding:
        writes = [t for t in dict.fromkeys(tools) if t in self.env.write_tools]
        users = [u for u in sorted(self.data.users) if u not in self.held_out]
        for tool in writes:
            fit = set(self.fitting(tool))
            users = [u for u in users if u in fit]
        if not users:
            raise GroundingUnsupported(f"no airline user has reservations that fit {writes}")
        user_id = rng.choice(users)
        moves = [m for t in writes for m in _sample(self.data.moves(user_id, t), rng)]
        used = list(dict.fromkeys(m.reservation_id for m in moves if m.reservation_id))
        others = [r for r in self.data.users[user_id]["reservations"] if r not in used]
        rng.shuffle(others)
        shown = used + others[: max(0, MAX_RESERVATIONS - len(used))]
        return Grounding(
            domain=self.env.name,
            tools=[t for t in dict.fromkeys(tools) if t in self.env.tool_names],
            user=self.data.user(user_id),
            reservations=[self.data.reservation(r) for r in shown],
            moves=moves,
        )

    def actions_schema(
        self, grounding: AnyGrounding, tools: Sequence[str], max_actions: int, lookups: bool
    ) -> JSON:
        if not isinstance(grounding, Grounding):
            raise GroundingUnsupported(f"not an airline grounding: {type(grounding).__name__}")
        wanted = [*tools, *READS] if lookups else list(tools)
        allowed = [t for t in dict.fromkeys(wanted) if t in self.env.tool_names]
        branches = [b for t in allowed for b in self._branches(grounding, t) if not empty(b)]
        return {"type": "array", "items": {"anyOf": branches}, "minItems": 1,
                "maxItems": max_actions}  # fmt: skip

    def _branches(self, g: Grounding, tool: str) -> list[JSON]:
        if tool in self.env.write_tools:
            return [branch(tool, move_arguments(m)) for m in g.moves if m.tool == tool]
        reservations = [r.reservation_id for r in g.reservations]
        segments = [s for r in g.reservations for s in r.segments]
        airports = [a for s in segments for a in (s.origin, s.destination)]
        dates = [s.date for s in segments]
        reads = {
            "get_user_details": {"user_id": enum([g.user.user_id])},
            "get_reservation_details": {"reservation_id": enum(reservations)},
            "search_direct_flight": {
                "origin": enum(airports), "destination": enum(airports), "date": enum(dates)
            },
            "search_onestop_flight": {
                "origin": enum(airports), "destination": enum(airports), "date": enum(dates)
            },
            "get_flight_status": {
                "flight_number": enum(s.flight_number for s in segments), "date": enum(dates)
            },
            "list_all_airports": {},
            "calculate": {"expression": text(60)},
            "transfer_to_human_agents": {"summary": text(200)},
        }  # fmt: skip
        return [branch(tool, reads[tool])] if tool in reads else []

    async def mutate(
        self, seed: Task, rng: random.Random, tools: Sequence[str] | None, envs: EnvPool
    ) -> Task | None:
        from sentinel.envs.tau2.airline.mutation import Mutation

        return await Mutation(self, seed, envs).run(rng, tools)


def move_arguments(move: Move) -> JSON:
    """A move's arguments as schema: each value fixed, the payment method one of its payers."""
    schema = {name: exactly(value) for name, value in move.arguments.items()}
    if "payment_id" in schema:
        schema["payment_id"] = enum(move.payers)
    if "payment_methods" in schema:
        [payment] = move.arguments["payment_methods"]
        paid = {"payment_id": enum(move.payers), "amount": exactly(payment["amount"])}
        schema["payment_methods"] = _items([obj(paid)])
    return schema


def exactly(value: Any) -> JSON:
    """A schema that admits only `value` (strings and integers as one-value enums, so that
    constrained decoding keeps them typed; lists item by item)."""
    if isinstance(value, bool):
        return {"type": "boolean", "enum": [value]}
    if isinstance(value, int):
        return {"type": "integer", "enum": [value]}
    if isinstance(value, str):
        return enum([value])
    if isinstance(value, list):
        return _items([exactly(v) for v in value])
    if isinstance(value, dict):
        return obj({k: exactly(v) for k, v in value.items()})
    raise TypeError(f"no schema for {type(value).__name__}")


def _items(schemas: list[JSON]) -> JSON:
    n = len(schemas)
    return {"type": "array", "prefixItems": schemas, "items": False, "minItems": n, "maxItems": n}


def _sample(moves: list[Move], rng: random.Random) -> list[Move]:
    """Up to MAX_MOVES moves, in their own order."""
    if len(moves) <= MAX_MOVES:
        return moves
    picked = sorted(rng.sample(range(len(moves)), MAX_MOVES))
    return [moves[i] for i in picked]


def _scenario_text(task: Task) -> str:
    i = task.spec.user_scenario.instructions
    if isinstance(i, UserInstructions):
        parts = (i.reason_for_call, i.known_info, i.unknown_info, i.task_instructions)
        return " ".join(p for p in parts if p)
    return str(i)
