"""What a task's user scenario lets the user say: identity facts to reveal, kinds of facts to
withhold, and the instruction text the user must not recite.

Values are pulled from the scenario text with patterns (tau2's scenarios write them plainly:
"You are Yusuf Rossi in zip code 19122", "You do not remember your email address"), so the
fidelity checks stay deterministic and need no LLM. The kinds of facts and the shape of a user
id are the domain's (`DomainPack.phrasing`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from sentinel.envs.pack import Kind, Phrasing
from sentinel.envs.registry import pack
from sentinel.schemas import Action, Task

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
ZIP = re.compile(r"\b\d{5}\b")
NAME = re.compile(
    r"(?:\b[Yy]ou are|\b[Yy]ou're|\bname is|\bcalled)\s+(?:user\s+)?"
    r"([A-Z][a-z]+)(?:\s+([A-Z][a-z]+))?"
)
NO_KIND = Kind("fact", re.compile(r"(?!)"), re.compile(r"(?!)"), "Could you tell me more?")


class Scenario(BaseModel):
    """The facts of one task's user scenario that the checks and the scripted user need."""

    task_id: str
    domain: str
    reason: str
    known: str
    unknown: str
    text: str  # every instruction the user got, for the verbatim-leak check
    first_name: str | None = None
    last_name: str | None = None
    zip_code: str | None = None
    emails: list[str] = []
    user_id: str | None = None
    withheld: str  # the Kind.name the user must not make up a value for

    @property
    def full_name(self) -> str | None:
        parts = [p for p in (self.first_name, self.last_name) if p]
        return " ".join(parts) or None

    @property
    def identity(self) -> list[str]:
        """Values any one of which identifies the user to the agent."""
        values = [*self.emails, self.user_id, self.zip_code, self.full_name]
        return [v for v in values if v]

    @property
    def withheld_kind(self) -> Kind:
        kinds = pack(self.domain).phrasing.kinds
        return next((k for k in kinds if k.name == self.withheld), NO_KIND)


def scenario_of(task: Task) -> Scenario:
    instructions = task.spec.user_scenario.instructions
    if isinstance(instructions, str):
        reason = known = instructions
        unknown = rest = ""
    else:
        reason, known = instructions.reason_for_call, instructions.known_info or ""
        unknown, rest = instructions.unknown_info or "", instructions.task_instructions
    text = " ".join(p for p in (reason, known, unknown, rest) if p)
    phrasing = pack(task.domain).phrasing
    withheld = _withheld(phrasing.kinds, unknown, text).name
    name = NAME.search(known)
    zip_code = ZIP.search(known)
    user_id = phrasing.user_id.search(known)
    return Scenario(
        task_id=task.id, domain=task.domain, reason=reason, known=known, unknown=unknown, text=text,
        first_name=name.group(1) if name else None, last_name=name.group(2) if name else None,
        zip_code=zip_code.group(0) if zip_code else None, emails=EMAIL.findall(known),
        user_id=user_id.group(0) if user_id else None, withheld=withheld,
    )  # fmt: skip


def _withheld(kinds: tuple[Kind, ...], unknown: str, text: str) -> Kind:
    """The kind unknown_info names; else the domain's fallback (its last kind), which its
    scenarios never give."""
    for kind in kinds:
        if kind.mention.search(unknown) and not kind.value.search(text):
            return kind
    return kinds[-1] if kinds else NO_KIND


def opening(writes: Sequence[Action], phrasing: Phrasing) -> str:
    """The user's first words: what they want, in the domain's customer words."""
    if not writes:
        return phrasing.question
    openings = (phrasing.openings.get(a.name, phrasing.default_opening) for a in writes)
    wants = list(dict.fromkeys(openings))
    return f"Hi, I'd like to {' and '.join(wants)}."


def identify(scenario: Scenario) -> str:
    """The user's answer to "who are you": the identity facts the scenario gives."""
    if scenario.emails:
        return f"Sure, my email is {scenario.emails[0]}."
    parts = []
    if scenario.full_name:
        parts.append(f"my name is {scenario.full_name}")
    if scenario.user_id:
        parts.append(f"my user id is {scenario.user_id}")
    if scenario.zip_code:
        parts.append(f"my zip code is {scenario.zip_code}")
    return f"Sure, {' and '.join(parts) or 'I am not sure what I can give you'}."


SPOKEN_CHARS = 80  # a gold argument longer than this is no detail a customer recites


def spoken(value: Any) -> list[str]:
    """The plain values in a tool call's arguments, as a customer would say them: strings
    and numbers, from lists and objects too; flags and long texts are not theirs to give."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in spoken(v)]
    if isinstance(value, list):
        return [s for v in value for s in spoken(v)]
    if isinstance(value, bool) or value is None:
        return []
    text = str(value).strip()
    return [text] if 0 < len(text) <= SPOKEN_CHARS else []
