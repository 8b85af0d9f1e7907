"""Retail's grounder: real users and orders for new tasks, and the gold actions' schema.

The Proposer's LLM writes tasks around an error pattern's tools. `ground` samples one user
whose orders fit those tools (what each write accepts is `entities.RetailData.fits`, the
statuses from the pack's state rules), `Grounding.describe` shows them to the LLM, and
`actions_schema` narrows every id argument of the gold actions to an enum of the grounded
ids, so even a tiny model under constrained decoding writes actions that run. `mutate` moves a
seed train task onto another user (`mutation`). Users of test-split tasks are never used.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from sentinel.envs.base import Environment
from sentinel.envs.episodes import EnvPool
from sentinel.envs.grounding import branch as _branch
from sentinel.envs.grounding import empty as _empty
from sentinel.envs.grounding import enum as _enum
from sentinel.envs.grounding import generic as _generic
from sentinel.envs.grounding import ids as _ids
from sentinel.envs.grounding import text as _text
from sentinel.envs.pack import Grounding as AnyGrounding
from sentinel.envs.pack import GroundingUnsupported
from sentinel.envs.tau2.retail.entities import (
    ADDRESS_FIELDS,
    JSON,
    ORDER_TOOLS,
    PAYERS,
    SWAPS,
    GroundedOrder,
    GroundedUser,
    Grounding,
    RetailData,
)
from sentinel.envs.tau2.retail.mutation import Mutation
from sentinel.schemas import Task

CANCEL_REASONS = ("no longer needed", "ordered by mistake")
MAX_ORDERS = 2  # orders per grounding, unless the tools need more
READS = (  # what an agent needs to find the user and look things up
    "find_user_id_by_email",
    "find_user_id_by_name_zip",
    "get_user_details",
    "get_order_details",
    "get_product_details",
)


class RetailGrounder(RetailData):
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
        return await Mutation(self, seed, envs).run(rng, tools)
