"""Grounding: real database entities for new tasks, and seed tasks moved onto other entities.

The Proposer's LLM writes tasks around an error pattern's tools. `ground` samples one user
whose orders fit those tools (pending orders to cancel or modify, delivered ones to return or
exchange), `Grounding.describe` shows them to the LLM, and `actions_schema` narrows every id
argument of the gold actions to an enum of the grounded ids, so even a tiny model under
constrained decoding writes actions that run. `mutate` moves a seed train task onto another
user: every gold action is rewritten to the new user's orders, items, available variants and
payment methods, the request is restated from the new gold writes, and the result is kept
only if its gold writes all succeed on a fresh episode and change the database.

Those replays run in an `EnvPool`'s limited children (`envs.episodes`), like rollouts: a tool
call is stopped at the pool's wall clock, so a seed whose gold holds a call like
`calculate("9**9**9")` costs one mutation (None, with a logged reason), never a frozen
Proposer; and the Proposer's event loop serves its streams while a replay runs.

Users of test-split tasks are never used. Which order statuses each write accepts comes from
the pack's state rules (`rules.RULES`), the table the policy signals read too.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sentinel.envs.base import Environment
from sentinel.envs.episodes import EnvPool, RemoteEpisode, ToolStopped
from sentinel.envs.grounding import branch as _branch
from sentinel.envs.grounding import empty as _empty
from sentinel.envs.grounding import enum as _enum
from sentinel.envs.grounding import generic as _generic
from sentinel.envs.grounding import ids as _ids
from sentinel.envs.grounding import text as _text
from sentinel.envs.pack import Grounding as AnyGrounding
from sentinel.envs.pack import GroundingUnsupported
from sentinel.envs.tau2.retail.rules import RULES
from sentinel.logs import get_logger
from sentinel.schemas import (
    Action,
    EvaluationCriteria,
    Origin,
    Provenance,
    Task,
    TaskSpec,
    ToolCall,
    UserInstructions,
    UserScenario,
)
from sentinel.schemas.message import Strict

log = get_logger(__name__)

JSON = dict[str, Any]
ADDRESS_FIELDS = ("address1", "address2", "city", "state", "country", "zip")
CANCEL_REASONS = ("no longer needed", "ordered by mistake")
MAX_ORDERS = 2  # orders per grounding, unless the tools need more
MAX_ALTERNATIVES = 3  # available variants per product: cheapest, middle, dearest
MAX_REPLAYS = 4  # candidate users whose mutated gold is replayed before giving up
READS = (  # what an agent needs to find the user and look things up
    "find_user_id_by_email",
    "find_user_id_by_name_zip",
    "get_user_details",
    "get_order_details",
    "get_product_details",
)
ORDER_TOOLS: dict[str, Callable[[str], bool]] = {r.tool: r.allows for r in RULES}  # statuses
ITEM_FIELDS = ("item_id", "product_id", "name", "options", "price")
SWAPS = ("exchange_delivered_order_items", "modify_pending_order_items")
PAYERS = ("return_delivered_order_items", "modify_pending_order_payment")
REFUNDS = ("cancel_pending_order", "return_delivered_order_items")
AMOUNT = re.compile(r"^\d+\.\d{1,2}$")


class Address(Strict):
    address1: str
    address2: str
    city: str
    state: str
    country: str
    zip: str

    def text(self) -> str:
        street = ", ".join(p for p in (self.address1, self.address2) if p)
        return f"{street}, {self.city}, {self.state} {self.zip}, {self.country}"


class PaymentMethod(Strict):
    id: str
    source: str  # credit_card, paypal or gift_card
    label: str  # as the customer calls it, e.g. "visa credit card ending in 1234"
    balance: float | None = None  # gift cards only


class Variant(Strict):
    item_id: str
    options: dict[str, str]
    price: float


class GroundedItem(Strict):
    item_id: str
    product_id: str
    name: str
    options: dict[str, str]
    price: float


class GroundedOrder(Strict):
    order_id: str
    status: str
    items: list[GroundedItem]
    payment_method_id: str  # the original payment's method
    total: float  # the original payment's amount
    payments: int  # transactions in the payment history


class GroundedProduct(Strict):
    product_id: str
    name: str
    alternatives: list[Variant]  # available variants, a spread of prices


class GroundedUser(Strict):
    user_id: str
    name: str
    first_name: str
    last_name: str
    email: str
    zip: str
    address: Address
    payment_methods: list[PaymentMethod]


class Grounding(Strict):
    """The real entities one proposal may use, sampled for `tools`."""

    domain: str
    tools: list[str]
    user: GroundedUser
    orders: list[GroundedOrder]
    products: list[GroundedProduct]

    def describe(self) -> str:
        """A compact text block for the prompt: the user, their orders, variants on offer."""
        u = self.user
        lines = [
            f"User {u.name} (user id {u.user_id}), email {u.email}, zip {u.zip}",
            f"Address: {u.address.text()}",
            "Payment methods: " + "; ".join(_method(m) for m in u.payment_methods),
        ]
        for o in self.orders:
            lines.append(
                f"Order {o.order_id} [{o.status}], ${o.total:.2f} paid with {o.payment_method_id}:"
            )
            lines += [
                f"  {i.item_id} {i.name} ({_values(i.options)}) ${i.price:.2f}" for i in o.items
            ]
        swappable = {i.product_id for o in self._swappable() for i in o.items}
        products = [p for p in self.products if p.product_id in swappable]
        if products:
            lines.append("Available variants of the same products (for new_item_ids):")
        for p in products:
            variants = "; ".join(
                f"{v.item_id} ({_values(v.options)}) ${v.price:.2f}" for v in p.alternatives
            )
            lines.append(f"  {p.name}: {variants}")
        return "\n".join(lines)

    def identity(self) -> str:
        u = self.user
        return f"You are {u.name}; your email is {u.email} and your zip code is {u.zip}."

    def _swappable(self) -> list[GroundedOrder]:
        swaps = [ORDER_TOOLS[t] for t in self.tools if t in SWAPS]
        return [o for o in self.orders if any(fits(o.status) for fits in swaps)]


def _method(m: PaymentMethod) -> str:
    balance = f", balance ${m.balance:.2f}" if m.balance is not None else ""
    return f"{m.id} ({m.label}{balance})"


def _values(options: dict[str, str]) -> str:
    return ", ".join(options.values())


def _options(options: dict[str, str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in options.items())


# --- retail: the database as entities --------------------------------------------------------


def _label(method: JSON, gift_cards: int) -> str:
    source = method["source"]
    if source == "credit_card":
        return f"{method['brand']} credit card ending in {method['last_four']}"
    if source == "gift_card":
        return f"gift card {method['id']}" if gift_cards > 1 else "gift card"
    return "PayPal account" if source == "paypal" else str(source)


def _covers(method: PaymentMethod, amount: float) -> bool:
    return method.balance is None or method.balance >= amount


def _spread(variants: list[JSON]) -> list[JSON]:
    """Up to MAX_ALTERNATIVES variants spread over the price range, cheapest first."""
    ranked = sorted(variants, key=lambda v: (v["price"], v["item_id"]))
    n = len(ranked)
    picks = {round(i * (n - 1) / (MAX_ALTERNATIVES - 1)) for i in range(MAX_ALTERNATIVES)}
    return [ranked[i] for i in sorted(picks)] if n else []


class _RetailData:
    """The retail database indexed once, its entities as models, and what fits each tool."""

    def __init__(self, domain: Environment) -> None:
        self.domain = domain
        db = domain.database
        self.users: dict[str, JSON] = db["users"]
        self.orders: dict[str, JSON] = db["orders"]
        self.products: dict[str, JSON] = db["products"]
        self.by_email = {u["email"].lower(): uid for uid, u in self.users.items()}
        self.by_name_zip = {_name_zip(u): uid for uid, u in self.users.items()}
        self.variants = {vid: v for p in self.products.values() for vid, v in p["variants"].items()}
        self.product_of = {vid: pid for pid, p in self.products.items() for vid in p["variants"]}
        self._users: dict[str, GroundedUser] = {}
        self._orders: dict[str, GroundedOrder] = {}
        self._products: dict[str, GroundedProduct] = {}
        self.succeeding: dict[str, list[Action]] = {}  # seed digest -> its gold that runs
        self.held_out = self._test_users()

    def _test_users(self) -> frozenset[str]:
        """Users of test tasks: never used, so new tasks cannot leak the test split."""
        users: set[str] = set()
        for task in self.domain.tasks("test"):
            users |= self.actors(task.actions)
        return frozenset(users)

    def actors(self, actions: Iterable[Action]) -> set[str]:
        """The users a task's actions touch ("" for an identity that matches nobody)."""
        users: set[str] = set()
        for a in actions:
            args = {k: str(v) for k, v in a.arguments.items() if isinstance(v, str)}
            if "user_id" in args:
                users.add(args["user_id"])
            if args.get("order_id") in self.orders:
                users.add(self.orders[args["order_id"]]["user_id"])
            if "email" in args:
                users.add(self.by_email.get(args["email"].lower(), ""))
            if "first_name" in args:
                key = (
                    args["first_name"].lower(),
                    args.get("last_name", "").lower(),
                    args.get("zip", ""),
                )
                users.add(self.by_name_zip.get(key, ""))
        return users

    def user(self, user_id: str) -> GroundedUser:
        if user_id not in self._users:
            u = self.users[user_id]
            methods = list(u["payment_methods"].values())
            gift_cards = sum(m["source"] == "gift_card" for m in methods)
            self._users[user_id] = GroundedUser(
                user_id=user_id,
                name=f"{u['name']['first_name']} {u['name']['last_name']}",
                first_name=u["name"]["first_name"],
                last_name=u["name"]["last_name"],
                email=u["email"],
                zip=u["address"]["zip"],
                address=Address(**{k: u["address"][k] for k in ADDRESS_FIELDS}),
                payment_methods=[
                    PaymentMethod(
                        id=m["id"], source=m["source"], label=_label(m, gift_cards),
                        balance=m.get("balance"),
                    )
                    for m in methods
                ],
            )  # fmt: skip
        return self._users[user_id]

    def order(self, order_id: str) -> GroundedOrder:
        if order_id not in self._orders:
            o = self.orders[order_id]
            history = o["payment_history"] or [{"payment_method_id": "", "amount": 0.0}]
            self._orders[order_id] = GroundedOrder(
                order_id=order_id,
                status=o["status"],
                items=[GroundedItem(**{k: i[k] for k in ITEM_FIELDS}) for i in o["items"]],
                payment_method_id=history[0]["payment_method_id"],
                total=history[0]["amount"],
                payments=len(o["payment_history"]),
            )  # fmt: skip
        return self._orders[order_id]

    def product(self, product_id: str) -> GroundedProduct:
        if product_id not in self._products:
            p = self.products[product_id]
            available = [v for v in p["variants"].values() if v["available"]]
            self._products[product_id] = GroundedProduct(
                product_id=product_id,
                name=p["name"],
                alternatives=[
                    Variant(**{k: v[k] for k in Variant.model_fields}) for v in _spread(available)
                ],
            )
        return self._products[product_id]

    def swap(self, user: GroundedUser, item: GroundedItem) -> tuple[list[str], list[str]] | None:
        """New item ids and payment method ids that make a valid swap of `item`."""
        methods = user.payment_methods
        offered = self.product(item.product_id).alternatives
        alternatives = [v for v in offered if v.item_id != item.item_id]
        if not alternatives or not methods:
            return None
        payers = [
            m.id for m in methods if _covers(m, max(v.price - item.price for v in alternatives))
        ]
        if not payers:  # gift cards only: the variants the richest card can pay for
            best = max(m.balance or 0.0 for m in methods)
            alternatives = [v for v in alternatives if v.price - item.price <= best]
            payers = [m.id for m in methods if m.balance == best]
        if not alternatives:
            return None
        return [v.item_id for v in alternatives], payers

    def payers(self, user: GroundedUser, order: GroundedOrder, tool: str) -> list[str]:
        """Payment method ids that a return or a payment change of `order` accepts."""
        if tool == "return_delivered_order_items":
            gift = [m.id for m in user.payment_methods if m.source == "gift_card"]
            return list(dict.fromkeys([order.payment_method_id, *gift]))
        if order.payments != 1:
            return []
        return [
            m.id
            for m in user.payment_methods
            if m.id != order.payment_method_id and _covers(m, order.total)
        ]

    def fits(self, user: GroundedUser, order: GroundedOrder, tool: str) -> bool:
        if not ORDER_TOOLS[tool](order.status):
            return False
        if tool in SWAPS:
            return any(self.swap(user, i) for i in order.items)
        return tool not in PAYERS or bool(self.payers(user, order, tool))

    def fitting(self, user_id: str, tool: str) -> list[GroundedOrder]:
        user = self.user(user_id)
        orders = (self.order(oid) for oid in self.users[user_id]["orders"])
        return [o for o in orders if self.fits(user, o, tool)]


def _name_zip(user: JSON) -> tuple[str, str, str]:
    name = user["name"]
    return name["first_name"].lower(), name["last_name"].lower(), user["address"]["zip"]


# --- retail: grounding and the actions schema -------------------------------------------------


class RetailGrounder(_RetailData):
    def __init__(self, domain: Environment) -> None:
        super().__init__(domain)
        self._fit: dict[str, frozenset[str]] = {}

    def _users_for(self, tool: str) -> frozenset[str]:
        """Users with an order that fits `tool`, found once per tool."""
        if tool not in self._fit:
            self._fit[tool] = frozenset(uid for uid in self.users if self.fitting(uid, tool))
        return self._fit[tool]

    def ground(self, tools: Sequence[str], rng: random.Random) -> Grounding:
        needed = [t for t in dict.fromkeys(tools) if t in ORDER_TOOLS]
        users = [
            uid for uid in sorted(self.users)
            if uid not in self.held_out and self.users[uid]["orders"]
            and all(uid in self._users_for(t) for t in needed)
        ]  # fmt: skip
        if not users:
            raise GroundingUnsupported(f"no retail user has orders that fit {needed}")
        user_id = rng.choice(users)
        orders = self._pick_orders(user_id, needed, rng)
        products = dict.fromkeys(i.product_id for o in orders for i in o.items)
        return Grounding(
            domain=self.domain.name,
            tools=[t for t in dict.fromkeys(tools) if t in self.domain.tool_names],
            user=self.user(user_id),
            orders=orders,
            products=[self.product(pid) for pid in products],
        )

    def _pick_orders(
        self, user_id: str, tools: list[str], rng: random.Random
    ) -> list[GroundedOrder]:
        """One fitting order per tool, then other fitting orders, up to MAX_ORDERS."""
        user = self.user(user_id)
        chosen: list[GroundedOrder] = []
        for tool in tools:
            if not any(self.fits(user, o, tool) for o in chosen):
                chosen.append(
                    rng.choice([o for o in self.fitting(user_id, tool) if o not in chosen])
                )
        others = [
            o for o in map(self.order, self.users[user_id]["orders"])
            if o not in chosen and (not tools or any(self.fits(user, o, t) for t in tools))
        ]  # fmt: skip
        rng.shuffle(others)
        return chosen + others[: max(0, MAX_ORDERS - len(chosen))]

    def actions_schema(
        self, grounding: AnyGrounding, tools: Sequence[str], max_actions: int, lookups: bool
    ) -> JSON:
        if not isinstance(grounding, Grounding):
            raise GroundingUnsupported(f"not a retail grounding: {type(grounding).__name__}")
        wanted = [*tools, *READS] if lookups else tools
        allowed = [t for t in dict.fromkeys(wanted) if t in self.domain.tool_names]
        branches = [b for t in allowed for b in self._branches(grounding, t) if not _empty(b)]
        items = {"anyOf": branches}
        return {"type": "array", "items": items, "minItems": 1, "maxItems": max_actions}

    def _branches(self, g: Grounding, tool: str) -> list[JSON]:
        """The argument shapes `tool` may take on the grounded entities."""
        orders = [o for o in g.orders if tool not in ORDER_TOOLS or ORDER_TOOLS[tool](o.status)]
        if tool in SWAPS:
            return [b for o in orders for b in self._swap_branches(g.user, o, tool)]
        if tool in PAYERS:
            return [b for o in orders if (b := self._payer_branch(g.user, o, tool))]
        if tool in ORDER_TOOLS and not orders:
            return []
        simple = self._simple(g, [o.order_id for o in orders])
        return [_branch(tool, simple[tool] if tool in simple else self._generic(tool))]

    @staticmethod
    def _simple(g: Grounding, order_ids: list[str]) -> dict[str, JSON]:
        """Arguments of the tools whose ids do not depend on each other."""
        u = g.user
        address = {k: _text(10 if k == "zip" else 60) for k in ADDRESS_FIELDS}
        return {
            "find_user_id_by_email": {"email": _enum([u.email])},
            "find_user_id_by_name_zip": {
                "first_name": _enum([u.first_name]), "last_name": _enum([u.last_name]),
                "zip": _enum([u.zip]),
            },
            "get_user_details": {"user_id": _enum([u.user_id])},
            "get_order_details": {"order_id": _enum(order_ids)},
            "get_product_details": {"product_id": _enum(p.product_id for p in g.products)},
            "cancel_pending_order": {"order_id": _enum(order_ids), "reason": _enum(CANCEL_REASONS)},
            "modify_pending_order_address": {"order_id": _enum(order_ids), **address},
            "modify_user_address": {"user_id": _enum([u.user_id]), **address},
        }  # fmt: skip

    def _swap_branches(self, user: GroundedUser, order: GroundedOrder, tool: str) -> list[JSON]:
        """One branch per item: that item, one of its product's variants, a payer."""
        branches = []
        for item in {i.item_id: i for i in order.items}.values():
            swap = self.swap(user, item)
            if swap is not None:
                arguments = {
                    "order_id": _enum([order.order_id]), "item_ids": _ids([item.item_id], 1),
                    "new_item_ids": _ids(swap[0], 1), "payment_method_id": _enum(swap[1]),
                }  # fmt: skip
                branches.append(_branch(tool, arguments))
        return branches

    def _payer_branch(self, user: GroundedUser, order: GroundedOrder, tool: str) -> JSON | None:
        payers = self.payers(user, order, tool)
        if not payers:
            return None
        arguments: JSON = {"order_id": _enum([order.order_id])}
        if tool == "return_delivered_order_items":
            arguments["item_ids"] = _ids((i.item_id for i in order.items), len(order.items))
        arguments["payment_method_id"] = _enum(payers)
        return _branch(tool, arguments)

    def _generic(self, tool: str) -> JSON:
        schema = next(s for s in self.domain.tool_schemas if s["function"]["name"] == tool)
        parameters = schema["function"].get("parameters", {}).get("properties", {})
        return {name: _generic(p) for name, p in parameters.items()}

    async def mutate(
        self, seed: Task, rng: random.Random, tools: Sequence[str] | None, envs: EnvPool
    ) -> Task | None:
        return await _Mutation(self, seed, envs).run(rng, tools)


# --- retail: mutation ------------------------------------------------------------------------


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


class _Mutation:
    """One seed task moved onto another user."""

    def __init__(self, data: _RetailData, seed: Task, envs: EnvPool) -> None:
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
        return [m.id for m in user.payment_methods if _covers(m, diff)]

    # -- the new gold actions

    async def _task(self, plan: _Plan, actions: list[Action], writes: list[Action]) -> Task | None:
        """The seed rewritten onto `plan`, if its gold writes succeed and change the database."""
        rewrite = _Rewrite(self.data, self.old, plan, [id(w) for w in writes])
        rewritten = [rewrite(a) for a in actions]
        replayed = await self._replay([a for a in rewritten if a is not None])
        if replayed is None:
            return None
        gold, refund = replayed
        return _Story(self.data, self.seed, self.old, plan).task(gold, refund)

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

    def __init__(self, data: _RetailData, old: str, plan: _Plan, writes: list[int]) -> None:
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


class _Story:
    """The mutated task's customer: the seed's manner, the new user, the new gold as a request."""

    def __init__(self, data: _RetailData, seed: Task, old: str, plan: _Plan) -> None:
        self.data = data
        self.seed = seed
        self.old = old
        self.plan = plan
        instructions = seed.spec.user_scenario.instructions
        assert isinstance(instructions, UserInstructions)  # checked in _Mutation.run
        self.instructions = instructions

    def task(self, gold: list[Action], refund: float) -> Task:
        seed, spec = self.seed, self.seed.spec
        body = json.dumps([seed.id, self.plan.user, [a.model_dump(mode="json") for a in gold]])
        digest = hashlib.sha256(body.encode()).hexdigest()[:8]
        writes = [a for a in gold if a.name in self.data.domain.write_tools]
        request, info = self._request(writes, refund)
        criteria = spec.evaluation_criteria or EvaluationCriteria()
        notes = f"mutated from {seed.id}: {self.old} -> {self.plan.user}"
        new_spec = TaskSpec(
            id=f"{spec.id}-mut-{digest}",
            description={**(spec.description or {}), "notes": notes},
            user_scenario=UserScenario(
                persona=spec.user_scenario.persona, instructions=self._instructions(request, gold)
            ),
            evaluation_criteria=EvaluationCriteria(
                actions=gold, communicate_info=info, reward_basis=criteria.reward_basis
            ),
        )
        provenance = Provenance(
            origin=Origin.MUTATED, split="train", generation=seed.provenance.generation + 1
        )
        return Task(
            id=f"{seed.id}-mut-{digest}", domain=seed.domain, spec=new_spec, provenance=provenance
        )

    def _instructions(self, request: str, gold: list[Action]) -> UserInstructions:
        """The seed's manner and unknowns, the new user's facts, the request restated."""
        i = self.instructions
        sub = self._substitute()
        return UserInstructions(
            domain=self.data.domain.name,
            reason_for_call=request,
            known_info=self._known(gold),
            unknown_info=sub(i.unknown_info) if i.unknown_info else i.unknown_info,
            task_instructions=sub(i.task_instructions),
        )

    def _known(self, gold: list[Action]) -> str:
        """Who the customer is, identifiable the way the gold finds them."""
        u = self.data.users[self.plan.user]
        seed_known = self.instructions.known_info or ""
        finds = [a.name for a in gold if a.name.startswith("find_user")]
        by_email = finds[0] == "find_user_id_by_email" if finds else "@" in seed_known
        name = f"{u['name']['first_name']} {u['name']['last_name']}"
        address = u["address"]
        known = (
            f"Your name is {name} and your email is {u['email']}."
            if by_email
            else f"Your name is {name}; you live in {address['city']}, zip code {address['zip']}."
        )
        return f"{known} Your user id is {self.plan.user}." if self.old in seed_known else known

    def _substitute(self) -> Callable[[str], str]:
        """Replaces the old user's names, email, zip, user id and order ids in a text."""
        o, n = self.data.users[self.old], self.data.users[self.plan.user]
        table = {
            self.old: self.plan.user,
            o["email"]: n["email"],
            o["name"]["first_name"]: n["name"]["first_name"],
            o["name"]["last_name"]: n["name"]["last_name"],
            o["address"]["zip"]: n["address"]["zip"],
            **self.plan.orders,
        }
        words = "|".join(re.escape(k) for k in sorted(table, key=len, reverse=True))
        pattern = re.compile(rf"(?<!\w)({words})(?!\w)")
        return lambda text: pattern.sub(lambda m: table[m.group(1)], text)

    def _request(self, writes: list[Action], refund: float) -> tuple[str, list[str]]:
        """The reason for the call, restated from the gold writes, and what to communicate."""
        ids = "#W" in self.instructions.reason_for_call  # the seed's customer knew order ids
        sentences = [self._sentence(a, ids) for a in writes]
        criteria = self.seed.spec.evaluation_criteria
        amounts = (
            [i for i in (criteria.communicate_info or []) if AMOUNT.match(i)] if criteria else []
        )
        if amounts and refund > 0 and all(a.name in REFUNDS for a in writes):
            sentences.append("You also want to know the total amount you will get back.")
            return " ".join(sentences), [f"{refund:.2f}"]
        return " ".join(sentences), []

    def _sentence(self, action: Action, ids: bool) -> str:
        """One write as the customer asks for it."""
        args, name = action.arguments, action.name
        if name == "modify_user_address":
            return f"You want your default address changed to {_address(args)}."
        order = self._order(args["order_id"], ids)
        methods = self.data.user(self.plan.user).payment_methods
        payer = next((m.label for m in methods if m.id == args.get("payment_method_id")), "")
        if name == "cancel_pending_order":
            why = {"no longer needed": "you no longer need it"}.get(
                args["reason"], "you ordered it by mistake"
            )
            return f"You want to cancel {order} because {why}."
        if name == "modify_pending_order_address":
            return f"You want {order} shipped to {_address(args)} instead."
        if name == "modify_pending_order_payment":
            return f"You want to pay for {order} with your {payer} instead."
        items = [self._item(args["order_id"], i) for i in args["item_ids"]]
        if name == "return_delivered_order_items":
            items_text = " and the ".join(items)
            return f"You want to return the {items_text} from {order}, refunded to your {payer}."
        news = [
            self._new(old, new)
            for old, new in zip(args["item_ids"], args["new_item_ids"], strict=False)
        ]
        swaps = " and the ".join(
            f"{item} for {new}" for item, new in zip(items, news, strict=False)
        )
        verb = "exchange" if name == "exchange_delivered_order_items" else "change"
        return f"In {order}, you want to {verb} the {swaps}; use your {payer} for any difference."

    def _order(self, order_id: str, ids: bool) -> str:
        order = self.data.orders[order_id]
        status = "pending" if "pending" in order["status"] else order["status"]
        if ids:
            return f"your {status} order {order_id}"
        names = list(dict.fromkeys(i["name"] for i in order["items"]))[:3]
        return f"your {status} order with the {', '.join(names)}"

    def _item(self, order_id: str, item_id: str) -> str:
        item = next(i for i in self.data.orders[order_id]["items"] if i["item_id"] == item_id)
        return f"{item['name']} ({_options(item['options'])})"

    def _new(self, old: str, new: str) -> str:
        if old == new:
            return "a new identical one"
        return f"the one with {_options(self.data.variants[new]['options'])}"


def _address(args: JSON) -> str:
    return Address(**{k: str(args[k]) for k in ADDRESS_FIELDS}).text()
