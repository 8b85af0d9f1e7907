"""tau2's retail domain: an online store's orders, items, users and payment methods."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sentinel.envs.pack import DomainPack, Grounder
from sentinel.envs.tau2.retail.phrasing import PHRASING
from sentinel.envs.tau2.retail.rules import RULES

if TYPE_CHECKING:
    from sentinel.envs.base import Environment


class Retail(DomainPack):
    name = "retail"
    persona = "a customer-service agent of an online retailer"
    policy_name = "the store's policy"
    rules = RULES
    phrasing = PHRASING
    entity_fields = (frozenset({"variants"}), frozenset({"payment_methods"}))

    def grounder(self, env: Environment) -> Grounder:
        from sentinel.envs.tau2.retail.grounder import RetailGrounder

        return RetailGrounder(env)


PACK = Retail()
