"""What a task's user scenario lets the user say: identity facts to reveal, kinds of facts to
withhold, and the instruction text the user must not recite.

Values are pulled from the scenario text with patterns (tau2 retail writes them plainly:
"You are Yusuf Rossi in zip code 19122", "You do not remember your email address"), so the
fidelity checks stay deterministic and need no LLM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel

from sentinel.schemas import Task

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
ZIP = re.compile(r"\b\d{5}\b")
USER_ID = re.compile(r"\b[a-z]+_[a-z]+_\d{4}\b")
ORDER_ID = re.compile(r"#?\bW\d{7}\b")
PHONE = re.compile(r"(?:\+?1[\s.-]?)?\(?\d{3}\)?[\s.-]?\d{3}[\s.-]?\d{4}\b")
NAME = re.compile(
    r"(?:\b[Yy]ou are|\b[Yy]ou're|\bname is|\bcalled)\s+(?:user\s+)?"
    r"([A-Z][a-z]+)(?:\s+([A-Z][a-z]+))?"
)


@dataclass(frozen=True)
class Kind:
    """A kind of fact the agent may ask for: how to recognise it in the scenario and a reply."""

    name: str
    mention: re.Pattern[str]  # the scenario's unknown_info talks about it
    value: re.Pattern[str]  # a value of it in a reply
    question: str  # how the scripted agent asks for it


KINDS = (
    Kind("email", re.compile(r"e-?mail", re.I), EMAIL,
         "Could you give me the email address on your account?"),
    Kind("order id", re.compile(r"order (?:id|number)", re.I), ORDER_ID,
         "Could you tell me the order number?"),
    Kind("zip code", re.compile(r"zip", re.I), ZIP,
         "Could you tell me your zip code?"),
    Kind("phone number", re.compile(r"phone", re.I), PHONE,
         "Could you give me the phone number on your account?"),
)  # fmt: skip
PHONE_KIND = KINDS[-1]


class Scenario(BaseModel):
    """The facts of one task's user scenario that the checks and the scripted user need."""

    task_id: str
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
        return next(k for k in KINDS if k.name == self.withheld)


def scenario_of(task: Task) -> Scenario:
    instructions = task.spec.user_scenario.instructions
    if isinstance(instructions, str):
        reason = known = instructions
        unknown = rest = ""
    else:
        reason, known = instructions.reason_for_call, instructions.known_info or ""
        unknown, rest = instructions.unknown_info or "", instructions.task_instructions
    text = " ".join(p for p in (reason, known, unknown, rest) if p)
    name = NAME.search(known)
    zip_code = ZIP.search(known)
    user_id = USER_ID.search(known)
    return Scenario(
        task_id=task.id, reason=reason, known=known, unknown=unknown, text=text,
        first_name=name.group(1) if name else None, last_name=name.group(2) if name else None,
        zip_code=zip_code.group(0) if zip_code else None, emails=EMAIL.findall(known),
        user_id=user_id.group(0) if user_id else None, withheld=_withheld(unknown, text).name,
    )  # fmt: skip


def _withheld(unknown: str, text: str) -> Kind:
    """The kind unknown_info names; else a phone number, which no retail scenario gives."""
    for kind in KINDS:
        if kind.mention.search(unknown) and not kind.value.search(text):
            return kind
    return PHONE_KIND
