"""Mutation: a seed train task moved onto another user.

Every gold action is rewritten to the new user's orders (of the same statuses as the seed's),
items, available variants and payment methods, the request is restated from the new gold
writes (`story`), and the result is kept only if its gold writes all succeed on a fresh
episode and change the database. Users of test-split tasks are never used.

Those replays run in an `EnvPool`'s limited children (`envs.episodes`), like rollouts: a tool
call is stopped at the pool's wall clock, so a seed whose gold holds a call like
`calculate("9**9**9")` costs one mutation (None; `envs.grounding.mutate` logs why), never a
frozen Proposer; and the Proposer's event loop serves its streams while a replay runs.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from sentinel.envs.episodes import EnvPool, RemoteEpisode, ToolStopped
from sentinel.envs.tau2.retail.entities import (
    ADDRESS_FIELDS,
    JSON,
    PAYERS,
    GroundedOrder,
    GroundedUser,
    RetailData,
    covers,
)
from sentinel.envs.tau2.retail.story import Story
from sentinel.schemas import Action, Task, ToolCall, UserInstructions

MAX_REPLAYS = 4  # candidate users whose mutated gold is replayed before giving up


@dataclass
class _Need:
    """What a seed's writes need from one of its orders."""

    status: str
    counts: Counter[str] = field(default_factory=Counter)  # item -> most copies in one write
    targets: dict[str, list[str]] = field(default_factory=dict)  # item -> its new item ids
    modify: bool = False  # modify_pending_order_items: a new item must differ from the old


@dataclass
class _Plan:
    """A seed's entities mapped onto one new user."""

    user: str
    orders: dict[str, str] = field(default_factory=dict)  # old order id -> new
    items: dict[tuple[str, str], str] = field(default_factory=dict)  # (old order, old item)
    targets: dict[tuple[str, str, str], str] = field(default_factory=dict)  # + old new item
    products: dict[str, str] = field(default_factory=dict)
    payments: dict[str, str] = field(default_factory=dict)  # old payment method -> new
    paid: dict[int, str] = field(default_factory=dict)  # write's index -> payment method


class Mutation:
    """One seed task moved onto another user."""

    def __init__(self, data: RetailData, seed: Task, envs: EnvPool) -> None:
        self.data = data
        self.seed = seed
        self.envs = envs  # where its actions run: never in this process
        self.write_tools = data.domain.write_tools
        self.old = ""  # the seed's user, found in run()

    async def run(self, rng: random.Random, tools: Sequence[str] | None) -> Task | None:
        spec = self.seed.spec
        if spec.initial_state is not None or not isinstance(
            spec.user_scenario.instructions, UserInstructions
        ):
            return None
        actions = await self._succeeding()
        writes = [a for a in actions if a.name in self.write_tools]
        focus = [a for a in writes if tools and a.name in tools]
        if focus and len(focus) < len(writes):
            actions = [a for a in actions if a.name not in self.write_tools or a in focus]
            writes = focus
        actors = self.data.actors(actions)
        if not writes or len(actors) != 1 or "" in actors:
            return None
        self.old = actors.pop()
        for plan in self._plans(self._needs(writes), writes, rng):
            task = await self._task(plan, actions, writes)
            if task is not None:
                return task
        return None

    async def _succeeding(self) -> list[Action]:
        """The seed's gold actions that succeed in replay (tau2 ignores the others too)."""
        key = hashlib.sha256(self.seed.spec.model_dump_json().encode()).hexdigest()
        if key not in self.data.succeeding:
            try:
                self.data.succeeding[key] = await self._replay_seed()
            except ToolStopped:  # its gold overruns the limits: never worth another replay
                self.data.succeeding[key] = []
                raise
        return self.data.succeeding[key]

    async def _replay_seed(self) -> list[Action]:
        kept = []
        async with _episode(self.envs, self.seed) as episode:
            for a in self.seed.actions:
                call = ToolCall(
                    id=a.action_id, name=a.name, arguments=a.arguments, requestor=a.requestor
                )
                if a.requestor == "assistant" and not (await episode.step(call)).error:
                    kept.append(a)
        return kept

    def _needs(self, writes: list[Action]) -> dict[str, _Need]:
        """Per order written to: its status, the items used and what they become."""
        needs: dict[str, _Need] = {}
        for a in writes:
            oid = a.arguments.get("order_id")
            if oid is None:
                continue
            need = needs.setdefault(oid, _Need(status=self.data.orders[oid]["status"]))
            items = list(a.arguments.get("item_ids", []))
            need.counts |= Counter(items)
            need.modify |= a.name == "modify_pending_order_items"
            for old, new in zip(items, a.arguments.get("new_item_ids", []), strict=False):
                need.targets.setdefault(old, []).append(new)
        return needs

    # -- finding a new user

    def _plans(
        self, needs: dict[str, _Need], writes: list[Action], rng: random.Random
    ) -> Iterator[_Plan]:
        """Mappings onto other users in random order, at most MAX_REPLAYS of them."""
        data = self.data
        statuses = Counter(n.status for n in needs.values())
        users = [
            uid for uid in sorted(data.users)
            if uid != self.old and uid not in data.held_out
            and not statuses - Counter(data.orders[o]["status"] for o in data.users[uid]["orders"])
        ]  # fmt: skip
        rng.shuffle(users)
        tried = 0
        for uid in users:
            if tried >= MAX_REPLAYS:
                return
            plan = self._plan(uid, needs, rng)
            if plan is not None and self._pay(plan, writes):
                tried += 1
                yield plan

    def _plan(self, user_id: str, needs: dict[str, _Need], rng: random.Random) -> _Plan | None:
        """Distinct orders of the same status whose items can stand in for the old ones."""
        plan = _Plan(user=user_id)
        pool = list(self.data.users[user_id]["orders"])
        rng.shuffle(pool)
        for oid, need in needs.items():
            candidates = [
                o for o in pool
                if o not in plan.orders.values() and self.data.orders[o]["status"] == need.status
            ]  # fmt: skip
            chosen = next((o for o in candidates if self._assign(plan, oid, o, need)), None)
            if chosen is None:
                return None
            plan.orders[oid] = chosen
        return plan

    def _assign(self, plan: _Plan, old_order: str, new_order: str, need: _Need) -> bool:
        """Map the old order's used items, and what they become, onto the new order's."""
        new_items = self.data.orders[new_order]["items"]
        items = {i["item_id"]: i for i in new_items}
        copies = Counter(i["item_id"] for i in new_items)
        olds = {i["item_id"]: i for i in self.data.orders[old_order]["items"]}
        mapping: dict[str, str] = {}
        targets: dict[tuple[str, str, str], str] = {}
        for old_id, count in need.counts.items():
            old = olds[old_id]
            ranked = sorted(
                (i for i in items if copies[i] >= count and i not in mapping.values()),
                key=lambda i: (items[i]["product_id"] != old["product_id"], i),
            )
            for new_id in ranked:
                found = self._targets(old, items[new_id], need.targets.get(old_id, []), need.modify)
                if found is not None:
                    mapping[old_id] = new_id
                    targets |= {(old_order, old_id, t): n for t, n in found.items()}
                    break
            else:
                return False
        plan.items |= {(old_order, o): n for o, n in mapping.items()}
        plan.targets |= targets
        for old_id, new_id in mapping.items():
            plan.products.setdefault(olds[old_id]["product_id"], items[new_id]["product_id"])
        return True

    def _targets(
        self, old: JSON, new: JSON, wanted: list[str], modify: bool
    ) -> dict[str, str] | None:
        """For each old new-item id, an available variant of the new item's product."""
        variants = self.data.products[new["product_id"]]["variants"]
        found: dict[str, str] = {}
        for target in dict.fromkeys(wanted):
            if target == old["item_id"] and not modify:  # the same item again
                if not variants[new["item_id"]]["available"]:
                    return None
                found[target] = new["item_id"]
                continue
            desired = dict(new["options"])
            if new["product_id"] == old["product_id"]:  # the same change of options
                changed = self.data.variants[target]["options"].items()
                desired |= {k: v for k, v in changed if old["options"].get(k) != v}
            choices = [
                v for v in variants.values()
                if v["available"] and v["item_id"] != new["item_id"]
                and v["item_id"] not in found.values()
            ]  # fmt: skip
            if not choices:
                return None
            found[target] = min(choices, key=lambda v: _distance(v, desired))["item_id"]
        return found

    def _pay(self, plan: _Plan, writes: list[Action]) -> bool:
        """A payment method per write that the new user has and the tool accepts."""
        user = self.data.user(plan.user)
        sources = {
            m["id"]: m["source"] for m in self.data.users[self.old]["payment_methods"].values()
        }
        for index, a in enumerate(writes):
            old_pm = a.arguments.get("payment_method_id")
            if old_pm is None:
                continue
            original = self.data.order(a.arguments["order_id"]).payment_method_id == old_pm
            new_order = self.data.order(plan.orders[a.arguments["order_id"]])
            preferred = [
                *([plan.payments[old_pm]] if old_pm in plan.payments else []),
                *([new_order.payment_method_id] if original else []),
                *(m.id for m in user.payment_methods if m.source == sources.get(old_pm)),
                *(m.id for m in user.payment_methods),
            ]  # fmt: skip
            valid = self._valid_payers(plan, a, user, new_order)
            chosen = next((p for p in preferred if p in valid), None)
            if chosen is None:
                return False
            plan.payments.setdefault(old_pm, chosen)
            plan.paid[index] = chosen
        return True

    def _valid_payers(
        self, plan: _Plan, action: Action, user: GroundedUser, order: GroundedOrder
    ) -> list[str]:
        if action.name in PAYERS:
            return self.data.payers(user, order, action.name)
        old_order = action.arguments["order_id"]
        prices = {i.item_id: i.price for i in order.items}
        diff = 0.0
        for old_item, old_target in zip(
            action.arguments["item_ids"], action.arguments["new_item_ids"], strict=False
        ):
            new_target = plan.targets[(old_order, old_item, old_target)]
            diff += (
                self.data.variants[new_target]["price"] - prices[plan.items[(old_order, old_item)]]
            )
        return [m.id for m in user.payment_methods if covers(m, diff)]

    # -- the new gold actions

    async def _task(self, plan: _Plan, actions: list[Action], writes: list[Action]) -> Task | None:
        """The seed rewritten onto `plan`, if its gold writes succeed and change the database."""
        rewrite = _Rewrite(self.data, self.old, plan, [id(w) for w in writes])
        rewritten = [rewrite(a) for a in actions]
        replayed = await self._replay([a for a in rewritten if a is not None])
        if replayed is None:
            return None
        gold, refund = replayed
        return Story(self.data, self.seed, self.old, plan.user, plan.orders).task(gold, refund)

    async def _replay(self, actions: list[Action]) -> tuple[list[Action], float] | None:
        """The actions that run (None if a write fails or nothing changes), and the refund."""
        kept: list[Action] = []
        refund = 0.0
        seen: dict[str, JSON] = {}  # order id -> its state after the last write
        async with _episode(self.envs, self.seed) as episode:  # no initial state: see run()
            initial = await episode.db_hashes()
            for a in actions:
                call = ToolCall(id=a.action_id, name=a.name, arguments=a.arguments)
                result = await episode.step(call)
                if result.error and a.name in self.write_tools:
                    return None
                if not result.error:
                    kept.append(a)
                if not result.error and a.name in self.write_tools and "order_id" in a.arguments:
                    refund += self._refund(a, json.loads(result.content), seen)
            if await episode.db_hashes() == initial:
                return None
        return kept, refund

    def _refund(self, action: Action, order: JSON, seen: dict[str, JSON]) -> float:
        """What a cancellation or a return pays back, read from the tool's result."""
        oid = action.arguments["order_id"]
        before = seen.get(oid, self.data.orders[oid])
        seen[oid] = order
        if action.name == "cancel_pending_order":
            return _refunded(order) - _refunded(before)
        if action.name == "return_delivered_order_items":
            prices = {i["item_id"]: float(i["price"]) for i in order["items"]}
            return sum(prices[i] for i in action.arguments["item_ids"])
        return 0.0


@asynccontextmanager
async def _episode(envs: EnvPool, task: Task) -> AsyncIterator[RemoteEpisode]:
    """A fresh episode of `task` in one of `envs`' children, closed after use."""
    episode = await envs.open(task)
    try:
        yield episode
    finally:
        await episode.close()


def _distance(variant: JSON, desired: dict[str, str]) -> tuple[int, str]:
    """Options that differ from the desired ones, then the id: the closest variant first."""
    same = sum(desired.get(k) == v for k, v in variant["options"].items())
    return -same, variant["item_id"]


def _refunded(order: JSON) -> float:
    return sum(
        float(p["amount"]) for p in order["payment_history"] if p["transaction_type"] == "refund"
    )


class _Rewrite:
    """Rewrites one gold action's arguments onto the plan's entities."""

    def __init__(self, data: RetailData, old: str, plan: _Plan, writes: list[int]) -> None:
        self.data = data
        self.plan = plan
        self.writes = writes  # id() of each write action, to find its payment method
        self.user = data.users[plan.user]
        self.orders = plan.orders | self._other_orders(old)
        self.addresses = self._addresses(old)
        self.moved: set[str] = set()  # orders and users whose address a write changed

    def _other_orders(self, old: str) -> dict[str, str]:
        """The old user's orders that are only read, onto the new user's unused ones."""
        data = self.data
        free = [o for o in self.user["orders"] if o not in self.plan.orders.values()]
        extra: dict[str, str] = {}
        for oid in data.users[old]["orders"]:
            if oid in self.plan.orders or not free:
                continue
            status = data.orders[oid]["status"]
            match = next((o for o in free if data.orders[o]["status"] == status), free[0])
            extra[oid] = match
            free.remove(match)
        return extra

    def _addresses(self, old: str) -> dict[tuple[str, ...], JSON]:
        """The old user's and old orders' addresses onto the new ones (the user's win)."""
        orders = self.data.orders
        mapping = {
            _key(orders[o]["address"]): orders[n]["address"] for o, n in self.plan.orders.items()
        }
        mapping[_key(self.data.users[old]["address"])] = self.user["address"]
        return mapping

    def __call__(self, action: Action) -> Action | None:
        """The action on the new entities; None when it has no counterpart."""
        args = dict(action.arguments)
        old_order = str(args.get("order_id", ""))
        if action.name == "calculate" or (old_order and old_order not in self.orders):
            return None  # calculate's operands were the old user's prices
        if old_order:
            args["order_id"] = self.orders[old_order]
        if "new_item_ids" in args:
            pairs = zip(args["item_ids"], args["new_item_ids"], strict=False)
            args["new_item_ids"] = [self.plan.targets[(old_order, i, t)] for i, t in pairs]
        if "item_ids" in args:
            args["item_ids"] = [self.plan.items[(old_order, i)] for i in args["item_ids"]]
        if "payment_method_id" in args:
            args["payment_method_id"] = self.plan.paid[self.writes.index(id(action))]
        return action.model_copy(update={"arguments": args | self._identity(args)})

    def _identity(self, args: JSON) -> JSON:
        """User ids, names, emails, addresses and products in the arguments."""
        user = self.user
        new: JSON = {}
        if "user_id" in args:
            new["user_id"] = self.plan.user
        if "email" in args:
            new["email"] = user["email"]
        if "first_name" in args:
            new |= {
                "first_name": user["name"]["first_name"],
                "last_name": user["name"]["last_name"],
            }
            new["zip"] = user["address"]["zip"]
        if "address1" in args:
            new |= self._address(args, str(args.get("order_id", self.plan.user)))
        if "product_id" in args:
            new["product_id"] = self.plan.products.get(args["product_id"], args["product_id"])
        return new

    def _address(self, args: JSON, entity: str) -> JSON:
        """The mapped address, unless it is where the entity already is: then the literal."""
        mapped = self.addresses.get(tuple(str(args.get(k, "")) for k in ADDRESS_FIELDS))
        first = entity not in self.moved
        self.moved.add(entity)
        current = self.data.orders.get(entity, self.user)
        if mapped is None or (first and _key(mapped) == _key(current["address"])):
            return {}  # a request to move it where it is would change nothing
        return {k: mapped[k] for k in ADDRESS_FIELDS}


def _key(address: JSON) -> tuple[str, ...]:
    return tuple(str(address[k]) for k in ADDRESS_FIELDS)
