"""Retail's database as entities: users, orders, products and payment methods as pydantic
models, indexed once, with what each write tool can act on.

`RetailData` reads the database once and builds the models on demand. Which order statuses a
write accepts comes only from the pack's state rules (`rules.RULES`, the table the policy
signals read too), through `ORDER_TOOLS`; the rest of `fits` is what tau2's tools check
beyond the status: an available variant to swap to, a payment method that covers the
difference or takes the refund. `Grounding` is one proposal's sample of these entities, as
the Proposer's prompt shows it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sentinel.envs.base import Environment
from sentinel.envs.tau2.retail.rules import RULES
from sentinel.schemas import Action
from sentinel.schemas.message import Strict

JSON = dict[str, Any]
ADDRESS_FIELDS = ("address1", "address2", "city", "state", "country", "zip")
ITEM_FIELDS = ("item_id", "product_id", "name", "options", "price")
MAX_ALTERNATIVES = 3  # available variants per product: cheapest, middle, dearest
ORDER_TOOLS: dict[str, Callable[[str], bool]] = {r.tool: r.allows for r in RULES}  # statuses
SWAPS = ("exchange_delivered_order_items", "modify_pending_order_items")
PAYERS = ("return_delivered_order_items", "modify_pending_order_payment")


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


def _label(method: JSON, gift_cards: int) -> str:
    source = method["source"]
    if source == "credit_card":
        return f"{method['brand']} credit card ending in {method['last_four']}"
    if source == "gift_card":
        return f"gift card {method['id']}" if gift_cards > 1 else "gift card"
    return "PayPal account" if source == "paypal" else str(source)


def covers(method: PaymentMethod, amount: float) -> bool:
    return method.balance is None or method.balance >= amount


def _spread(variants: list[JSON]) -> list[JSON]:
    """Up to MAX_ALTERNATIVES variants spread over the price range, cheapest first."""
    ranked = sorted(variants, key=lambda v: (v["price"], v["item_id"]))
    n = len(ranked)
    picks = {round(i * (n - 1) / (MAX_ALTERNATIVES - 1)) for i in range(MAX_ALTERNATIVES)}
    return [ranked[i] for i in sorted(picks)] if n else []


class RetailData:
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
            m.id for m in methods if covers(m, max(v.price - item.price for v in alternatives))
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
            if m.id != order.payment_method_id and covers(m, order.total)
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
