"""tau2's airline domain: flights, reservations, passengers, baggage and payment methods."""

from __future__ import annotations

from sentinel.envs.pack import DomainPack


class Airline(DomainPack):
    name = "airline"
    persona = "a customer-service agent of an airline"
    policy_name = "the airline's policy"


PACK = Airline()
