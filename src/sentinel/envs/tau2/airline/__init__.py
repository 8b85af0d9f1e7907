"""tau2's airline domain: flights, reservations, passengers, baggage and payment methods."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sentinel.envs.pack import DomainPack, Grounder
from sentinel.envs.tau2.airline.phrasing import PHRASING
from sentinel.envs.tau2.airline.rules import ACTIVE, RULES

if TYPE_CHECKING:
    from sentinel.envs.base import Environment


class Airline(DomainPack):
    name = "airline"
    persona = "a customer-service agent of an airline"
    policy_name = "the airline's policy"
    rules = RULES
    null_status = ACTIVE  # tau2 leaves a live reservation's status null
    phrasing = PHRASING
    entity_fields = (frozenset(), frozenset({"payment_methods"}))  # a user's payment methods

    def grounder(self, env: Environment) -> Grounder:
        from sentinel.envs.tau2.airline.grounder import AirlineGrounder

        return AirlineGrounder(env)


PACK = Airline()
