"""tau2's telecom domain: customers, lines, plans and bills, and the user's own phone.

Its user has tools of their own (the phone: toggle_airplane_mode, check_status_bar, ...),
which the user simulator calls (`agents.user`); the agent's writes are on lines (suspend,
resume, roaming, data refuel) and bills (payment requests). `lean` is its condensed prompt for
small-context models (`rollout.lean_prompt`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sentinel.envs.pack import DomainPack, Grounder
from sentinel.envs.tau2.telecom import lean
from sentinel.envs.tau2.telecom.phrasing import PHRASING
from sentinel.envs.tau2.telecom.rules import RULES

if TYPE_CHECKING:
    from sentinel.envs.base import Environment


class Telecom(DomainPack):
    name = "telecom"
    persona = "a technical-support agent of a mobile carrier"
    policy_name = "the carrier's policy"
    rules = RULES
    phrasing = PHRASING

    def grounder(self, env: Environment) -> Grounder:
        from sentinel.envs.tau2.telecom.grounding import TelecomGrounder

        return TelecomGrounder(env)

    def lean_policy(self, policy: str) -> str:
        return lean.lean_policy(policy)

    def lean_tools(self, schemas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return lean.lean_tools(schemas)


PACK = Telecom()
