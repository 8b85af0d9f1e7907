"""A mutated task's customer: the seed's manner and unknowns, the new user's facts, and the
request restated from the new gold writes (with the refund to communicate where the seed's
customer asked for an amount)."""

from __future__ import annotations

import re
from collections.abc import Callable

from sentinel.envs.grounding import restated
from sentinel.envs.tau2.retail.entities import ADDRESS_FIELDS, JSON, Address, RetailData
from sentinel.schemas import (
    Action,
    Task,
    UserInstructions,
)

REFUNDS = ("cancel_pending_order", "return_delivered_order_items")
AMOUNT = re.compile(r"^\d+\.\d{1,2}$")


class Story:
    """The mutated task's customer: the seed's manner, the new user, the new gold as a request."""

    def __init__(
        self, data: RetailData, seed: Task, old: str, user: str, orders: dict[str, str]
    ) -> None:
        self.data = data
        self.seed = seed
        self.old = old  # the seed's user
        self.user = user  # the new one
        self.orders = orders  # the seed's order ids -> the new user's
        instructions = seed.spec.user_scenario.instructions
        assert isinstance(instructions, UserInstructions)  # checked in Mutation.run
        self.instructions = instructions

    def task(self, gold: list[Action], refund: float) -> Task:
        writes = [a for a in gold if a.name in self.data.domain.write_tools]
        request, info = self._request(writes, refund)
        return restated(
            self.seed, gold, self._instructions(request, gold), key=self.user,
            notes=f"mutated from {self.seed.id}: {self.old} -> {self.user}", communicate_info=info,
        )  # fmt: skip

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
        u = self.data.users[self.user]
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
        return f"{known} Your user id is {self.user}." if self.old in seed_known else known

    def _substitute(self) -> Callable[[str], str]:
        """Replaces the old user's names, email, zip, user id and order ids in a text."""
        o, n = self.data.users[self.old], self.data.users[self.user]
        table = {
            self.old: self.user,
            o["email"]: n["email"],
            o["name"]["first_name"]: n["name"]["first_name"],
            o["name"]["last_name"]: n["name"]["last_name"],
            o["address"]["zip"]: n["address"]["zip"],
            **self.orders,
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
        methods = self.data.user(self.user).payment_methods
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


def _options(options: dict[str, str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in options.items())
