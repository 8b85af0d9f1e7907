"""A seed airline task moved onto another user.

Each gold write of the seed becomes a move (`airline.policy`) of the same tool, and the same
kind where the new user has one (a cabin change stays a cabin change, a flight swap a swap),
on the new user's reservations: one new reservation per old one, so two writes on one
reservation stay on one. The lookups are rebuilt around the new writes (the user's profile
if the seed read it, each written reservation, the route searched for a booking), and the
request is restated from the moves, since a seed's scenario is full of its own user's
trips. The result is kept only if every gold write succeeds on a fresh episode in the
`EnvPool` and the database changes; at most MAX_REPLAYS users are tried.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sentinel.envs.episodes import EnvPool
from sentinel.envs.grounding import restated
from sentinel.envs.tau2.airline.policy import Move
from sentinel.schemas import (
    Action,
    Task,
    ToolCall,
    UserInstructions,
)

if TYPE_CHECKING:
    from sentinel.envs.tau2.airline.grounder import AirlineGrounder

MAX_REPLAYS = 4  # candidate users whose new gold is replayed before giving up
MANNER = (
    "Give your user id when asked. When the agent lists the details of a change and asks "
    "you to confirm, say yes. You want nothing beyond your request."
)


class Mutation:
    """One seed task moved onto another user."""

    def __init__(self, grounder: AirlineGrounder, seed: Task, envs: EnvPool) -> None:
        self.grounder = grounder
        self.data = grounder.data
        self.seed = seed
        self.envs = envs  # where its actions run: never in this process
        self.write_tools = grounder.env.write_tools

    async def run(self, rng: random.Random, tools: Sequence[str] | None) -> Task | None:
        spec = self.seed.spec
        if spec.initial_state is not None or not isinstance(
            spec.user_scenario.instructions, UserInstructions
        ):
            return None
        writes = [a for a in self.seed.actions if a.name in self.write_tools]
        focus = [a for a in writes if tools and a.name in tools]
        writes = focus or writes
        actors = self.grounder.actors(self.seed.actions)
        if not writes or len(actors) != 1 or "" in actors:
            return None
        old = actors.pop()
        fit = set.intersection(*(set(self.grounder.fitting(a.name)) for a in writes))
        users = sorted(fit - {old})
        rng.shuffle(users)
        tried = 0
        for user_id in users:
            moves = self._moves(user_id, writes, rng)
            if moves is None:
                continue
            gold = self._gold(user_id, moves)
            if await self._runs(gold):
                return self._task(user_id, moves, gold)
            tried += 1
            if tried >= MAX_REPLAYS:
                break
        return None

    # -- the new writes

    def _moves(self, user_id: str, writes: list[Action], rng: random.Random) -> list[Move] | None:
        """A move per seed write on the new user, or None if one has none."""
        mapped: dict[str, str] = {}  # old reservation id -> new
        chosen: list[Move] = []
        for a in writes:
            old = a.arguments.get("reservation_id")
            candidates = [m for m in self.data.moves(user_id, a.name) if m not in chosen]
            if isinstance(old, str) and old in mapped:
                candidates = [m for m in candidates if m.reservation_id == mapped[old]]
            else:
                used = set(mapped.values())
                candidates = [m for m in candidates if m.reservation_id not in used]
            if not candidates:
                return None
            kind = self._kind(a)
            same = [m for m in candidates if m.kind == kind]
            move = rng.choice(same or candidates)
            if isinstance(old, str) and move.reservation_id is not None:
                mapped[old] = move.reservation_id
            chosen.append(move)
        return chosen

    def _kind(self, action: Action) -> str | None:
        """A flight update's kind: a cabin change if the cabin changes, else a swap."""
        if action.name != "update_reservation_flights":
            return None
        old = self.data.reservations.get(str(action.arguments.get("reservation_id")), {})
        return "cabin" if action.arguments.get("cabin") != old.get("cabin") else "swap"

    def _gold(self, user_id: str, moves: list[Move]) -> list[Action]:
        """The lookups an agent needs, then the writes."""
        seed_reads = {a.name for a in self.seed.actions}
        calls: list[tuple[str, dict[str, object]]] = []
        if "get_user_details" in seed_reads:
            calls.append(("get_user_details", {"user_id": user_id}))
        for m in moves:
            if m.reservation_id is not None and m.tool != "send_certificate":
                calls.append(("get_reservation_details", {"reservation_id": m.reservation_id}))
            if m.tool == "book_reservation" and "search_direct_flight" in seed_reads:
                args = m.arguments
                search = {"origin": args["origin"], "destination": args["destination"],
                          "date": args["flights"][0]["date"]}  # fmt: skip
                calls.append(("search_direct_flight", search))
        unique = list({json.dumps(c, sort_keys=True): c for c in calls}.values())
        unique += [(m.tool, m.arguments) for m in moves]
        return [Action(action_id=str(i), name=n, arguments=a) for i, (n, a) in enumerate(unique)]

    async def _runs(self, gold: list[Action]) -> bool:
        """Whether every gold call succeeds on a fresh episode and the database changes."""
        episode = await self.envs.open(self.seed)
        try:
            initial = await episode.db_hashes()
            for a in gold:
                result = await episode.step(ToolCall(id=a.action_id, name=a.name,
                                                     arguments=a.arguments))  # fmt: skip
                if result.error:
                    return False
            return await episode.db_hashes() != initial
        finally:
            await episode.close()

    # -- the new task

    def _task(self, user_id: str, moves: list[Move], gold: list[Action]) -> Task:
        seed = self.seed
        user = self.data.user(user_id)
        request = " ".join(_request(m) for m in moves)
        instructions = UserInstructions(
            domain=self.grounder.env.name,
            reason_for_call=request,
            known_info=f"You are {user.name}.\nYour user id is {user_id}.",
            unknown_info=None,
            task_instructions=MANNER,
        )
        notes = f"mutated from {seed.id}: {sorted(self.grounder.actors(seed.actions))} -> {user_id}"
        return restated(seed, gold, instructions, key=user_id, notes=notes)


def _request(move: Move) -> str:
    """The move as the customer asks for it, with the payment method the gold uses."""
    args = move.arguments
    payer = args.get("payment_id") or (args.get("payment_methods") or [{}])[0].get("payment_id")
    return f"{move.request} You pay with {payer}." if payer else move.request
