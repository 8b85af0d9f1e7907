"""tau2's telecom domain: customers, lines, plans and bills, and the user's own phone."""

from __future__ import annotations

from sentinel.envs.pack import DomainPack


class Telecom(DomainPack):
    name = "telecom"
    persona = "a technical-support agent of a mobile carrier"
    policy_name = "the carrier's policy"


PACK = Telecom()
