"""Grounding for telecom: real customers, their lines and bills, for new tasks; seed tasks moved
onto other customers.

`ground` samples one customer whose lines and bills fit the requested writes (an Active line
to suspend, a Suspended one to resume, a line whose roaming a toggle would change, an Overdue
bill to request payment for), `Grounding.describe` shows them to the Proposer's LLM, and
`actions_schema` narrows every id argument to the grounded ids. `mutate` moves a seed train
task (tau2's are all John Smith's line L1002) onto another customer's line: the customer id,
line id, phone number and names are substituted throughout the spec (initial state, gold
actions of both sides, assertions, scenario), and the result is kept only if a replay of its
gold in an `EnvPool` child scores 1 by tau2's reward and changes the database.

Customers named by test-split tasks are never used, so new tasks cannot leak the test split.
Which line statuses the writes accept comes from the pack's state rules (`rules.RULES`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from sentinel.envs.base import Environment
from sentinel.envs.episodes import EnvFailure, EnvPool, ToolStopped
from sentinel.envs.grounding import branch, enum, generic, mutant, text
from sentinel.envs.pack import Grounding as AnyGrounding
from sentinel.envs.pack import GroundingUnsupported
from sentinel.envs.tau2.telecom.rules import RULES
from sentinel.logs import get_logger
from sentinel.schemas import (
    ChatMessage,
    Task,
    TaskSpec,
    TerminationReason,
    ToolCall,
)
from sentinel.schemas.message import Strict

log = get_logger(__name__)

JSON = dict[str, Any]
MAX_REPLAYS = 4  # candidate lines whose mutated seed is replayed before giving up
REFUELS = (0.5, 1.0, 2.0)  # GB: the policy allows at most 2
STATUS = {r.tool: r.allows for r in RULES}
ID = re.compile(r"\b[A-Z]\d{4}\b|\b\d{3}-\d{3}-\d{4}\b")  # customer, line, bill ids, phones


class Line(Strict):
    line_id: str
    phone_number: str
    status: str
    plan: str
    data_limit_gb: float
    data_used_gb: float
    roaming_enabled: bool


class Bill(Strict):
    bill_id: str
    status: str
    total_due: float
    due_date: str


class Customer(Strict):
    customer_id: str
    full_name: str
    date_of_birth: str
    phone_number: str
    lines: list[Line]
    bills: list[Bill]


def line_fits(tool: str, line: Line) -> bool:
    """Whether `tool` on `line` runs and changes it (the state rules, then roaming)."""
    if tool in STATUS:
        return STATUS[tool](line.status)
    if tool in ("enable_roaming", "disable_roaming"):
        return line.roaming_enabled == (tool == "disable_roaming")
    return tool == "refuel_data"


def bill_fits(customer: Customer, bill: Bill) -> bool:
    """An Overdue bill (the policy), and no other awaiting payment (the tool)."""
    waiting = any(b.status == "Awaiting Payment" for b in customer.bills)
    return bill.status == "Overdue" and not waiting


class Grounding(Strict):
    """The real entities one proposal may use, sampled for `tools`."""

    domain: str
    tools: list[str]
    customer: Customer
    line_id: str  # the user's own line: what they identify with

    def describe(self) -> str:
        c = self.customer
        rows = [
            f"Customer {c.full_name} (customer id {c.customer_id}), born {c.date_of_birth}, "
            f"contact phone {c.phone_number}",
            "Lines:",
        ]
        rows += [
            f"  {x.line_id} phone {x.phone_number} [{x.status}] {x.plan}: "
            f"{x.data_used_gb} of {x.data_limit_gb} GB used, "
            f"roaming {'on' if x.roaming_enabled else 'off'}"
            for x in c.lines
        ]
        rows.append("Bills:" if c.bills else "Bills: none")
        rows += [
            f"  {b.bill_id} [{b.status}] ${b.total_due:.2f}, due {b.due_date}" for b in c.bills
        ]
        return "\n".join(rows)

    def identity(self) -> str:
        phone = next(x.phone_number for x in self.customer.lines if x.line_id == self.line_id)
        return f"You are {self.customer.full_name}; the phone number of your line is {phone}."


class TelecomGrounder:
    """The telecom database indexed once: customers as models, test customers held out."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        db = env.database
        plans = {p["plan_id"]: p for p in db["plans"]}
        lines = {x["line_id"]: x for x in db["lines"]}
        bills = {b["bill_id"]: b for b in db["bills"]}
        self.customers = {
            c["customer_id"]: _customer(c, lines, bills, plans) for c in db["customers"]
        }
        self.held_out = self._test_customers()

    def _test_customers(self) -> frozenset[str]:
        """Customers whose id, name, line or phone any test task mentions."""
        texts = [t.spec.model_dump_json() for t in self.env.tasks("test")]
        return frozenset(
            c.customer_id for c in self.customers.values()
            if any(_mentions(text, c) for text in texts)
        )  # fmt: skip

    def usable(self) -> list[Customer]:
        return [c for cid, c in sorted(self.customers.items()) if cid not in self.held_out]

    def fits(self, customer: Customer, tool: str) -> bool:
        if tool == "send_payment_request":
            return any(bill_fits(customer, b) for b in customer.bills)
        if tool in self.env.write_tools:
            return any(line_fits(tool, x) for x in customer.lines)
        return True  # reads and transfers need only the customer

    def ground(self, tools: Sequence[str], rng: random.Random) -> Grounding:
        candidates = [c for c in self.usable() if c.lines and all(self.fits(c, t) for t in tools)]
        if not candidates:
            raise GroundingUnsupported(f"no held-in customer fits {', '.join(tools)}")
        customer = rng.choice(candidates)
        line_tools = [t for t in tools if t in self.env.write_tools and t in _LINE_TOOLS]
        fitting = [x for x in customer.lines if all(line_fits(t, x) for t in line_tools[:1])]
        line = rng.choice(fitting or customer.lines)
        return Grounding(
            domain=self.env.name, tools=list(tools), customer=customer, line_id=line.line_id
        )

    def actions_schema(
        self, grounding: AnyGrounding, tools: Sequence[str], max_actions: int, lookups: bool
    ) -> JSON:
        if not isinstance(grounding, Grounding):
            raise TypeError(f"not a telecom grounding: {type(grounding).__name__}")
        chosen = [*(_READS if lookups else ()), *tools]
        branches = [b for t in dict.fromkeys(chosen) for b in self._branches(grounding, t)]
        items = {"anyOf": branches}
        return {"type": "array", "items": items, "minItems": 1, "maxItems": max_actions}

    def _branches(self, g: Grounding, tool: str) -> list[JSON]:
        """The argument shapes `tool` may take on the grounded entities (none if none fit)."""
        c = g.customer
        customer = enum([c.customer_id])
        phones = enum([c.phone_number, *(x.phone_number for x in c.lines)])
        every = enum([c.customer_id, *(x.line_id for x in c.lines), *(b.bill_id for b in c.bills)])
        shapes: dict[str, Callable[[], JSON]] = {
            "get_customer_by_phone": lambda: {"phone_number": phones},
            "get_customer_by_id": lambda: {"customer_id": customer},
            "get_customer_by_name": lambda: {
                "full_name": enum([c.full_name]),
                "dob": enum([c.date_of_birth]),
            },
            "get_details_by_id": lambda: {"id": every},
            "get_bills_for_customer": lambda: {"customer_id": customer},
            "get_data_usage": lambda: {"customer_id": customer, "line_id": self._lines(c, "")},
            "suspend_line": lambda: {
                "customer_id": customer,
                "line_id": self._lines(c, tool),
                "reason": text(100),
            },
            "refuel_data": lambda: {
                "customer_id": customer,
                "line_id": self._lines(c, tool),
                "gb_amount": {"type": "number", "enum": list(REFUELS)},
            },
            "send_payment_request": lambda: {
                "customer_id": customer,
                "bill_id": enum(b.bill_id for b in c.bills if bill_fits(c, b)),
            },
            "transfer_to_human_agents": lambda: {"summary": text(200)},
        }
        if tool in _LINE_TOOLS and tool not in shapes:
            shapes[tool] = lambda: {"customer_id": customer, "line_id": self._lines(c, tool)}
        if tool in shapes:
            arguments = shapes[tool]()
            return [] if any(v.get("enum") == [] for v in arguments.values()) else [
                branch(tool, arguments)
            ]  # fmt: skip
        return [branch(tool, self._generic(tool))] if tool in self.env.tool_names else []

    @staticmethod
    def _lines(c: Customer, tool: str) -> JSON:
        """The customer's lines `tool` fits (every line for a read)."""
        return enum(x.line_id for x in c.lines if not tool or line_fits(tool, x))

    def _generic(self, tool: str) -> JSON:
        schema = next(s for s in self.env.tool_schemas if s["function"]["name"] == tool)
        parameters = schema["function"].get("parameters", {}).get("properties", {})
        return {name: generic(p) for name, p in parameters.items()}

    async def mutate(
        self, seed: Task, rng: random.Random, tools: Sequence[str] | None, envs: EnvPool
    ) -> Task | None:
        """`seed` on another customer's line, kept if its gold scores 1 on a replay in `envs`
        and changes the database; None when no line fits. (`tools` is not used to drop gold
        actions: telecom's gold is a repair sequence whose end state the assertions check.)"""
        old = self._seed_line(seed)
        if old is None:
            return None
        targets = [(c, x) for c in self.usable() for x in c.lines]
        for customer, line in rng.sample(targets, k=min(len(targets), MAX_REPLAYS)):
            task = self._moved(seed, old, customer, line)
            try:
                if await _solved(task, envs, self.env.write_tools):
                    return task
            except ToolStopped:
                raise  # the seed's gold runs past the limits: no point in other lines
            except EnvFailure as error:  # its initial state does not apply on this line
                log.debug("mutation did not replay", seed=seed.id, reason=str(error)[:200])
        return None

    def _seed_line(self, seed: Task) -> tuple[Customer, Line] | None:
        """The customer and line a seed task is about: the line whose phone it names."""
        body = seed.spec.model_dump_json()
        for customer in self.customers.values():
            for line in customer.lines:
                if line.phone_number in body:
                    return customer, line
        return None

    def _moved(
        self, seed: Task, old: tuple[Customer, Line], customer: Customer, line: Line
    ) -> Task:
        """The seed's spec with the old customer's ids, phone and names replaced."""
        was, line_was = old
        table = {
            was.customer_id: customer.customer_id,
            line_was.line_id: line.line_id,
            line_was.phone_number: line.phone_number,
            was.phone_number: line.phone_number,  # the user knows their line's number
            was.full_name: customer.full_name,
            was.date_of_birth: customer.date_of_birth,
            **dict(zip(was.full_name.split(), customer.full_name.split(), strict=False)),
        }
        words = "|".join(re.escape(k) for k in sorted(table, key=len, reverse=True))
        pattern = re.compile(rf"(?<![\w-])({words})(?![\w-])")
        body = pattern.sub(lambda m: table[m.group(1)], seed.spec.model_dump_json())
        notes = f"mutated from {seed.id} onto {customer.customer_id} {line.line_id}"
        return mutant(
            seed,
            TaskSpec.model_validate_json(body),
            f"{customer.customer_id}-{line.line_id}",
            notes,
        )


async def _solved(task: Task, envs: EnvPool, writes: frozenset[str]) -> bool:
    """Whether `task`'s gold (both sides' calls) scores 1 on a fresh episode and changes the
    database."""
    episode = await envs.open(task)
    try:
        initial = await episode.db_hashes()
        messages = [ChatMessage(role="user", content="Hi.")]
        for i, action in enumerate(task.actions):
            call = ToolCall(
                id=f"gold-{i}", name=action.name, arguments=action.arguments,
                requestor=action.requestor,
            )  # fmt: skip
            result = await episode.step(call)
            if result.error and action.name in writes:
                return False
            role = "user" if action.requestor == "user" else "assistant"
            messages.append(ChatMessage(role=role, tool_calls=[call]))
            messages.append(
                ChatMessage(role="tool", content=result.content, tool_call_id=call.id,
                            error=result.error)
            )  # fmt: skip
        criteria = task.spec.evaluation_criteria
        said = " ".join((criteria.communicate_info or []) if criteria else [])
        messages.append(ChatMessage(role="assistant", content=f"Done. {said}"))
        if await episode.db_hashes() == initial:
            return False
        reward = await episode.reward(messages, TerminationReason.AGENT_STOP)
        return reward.reward == 1.0
    finally:
        await episode.close()


_LINE_TOOLS = frozenset(
    {"suspend_line", "resume_line", "enable_roaming", "disable_roaming", "refuel_data"}
)
_READS = (
    "get_customer_by_phone",
    "get_customer_by_id",
    "get_customer_by_name",
    "get_details_by_id",
    "get_bills_for_customer",
    "get_data_usage",
)


def _customer(
    record: JSON, lines: dict[str, JSON], bills: dict[str, JSON], plans: dict[str, JSON]
) -> Customer:
    def line(x: JSON) -> Line:
        plan = plans.get(x["plan_id"], {})
        return Line(
            line_id=x["line_id"], phone_number=x["phone_number"], status=x["status"],
            plan=str(plan.get("name", x["plan_id"])),
            data_limit_gb=float(plan.get("data_limit_gb", 0.0)),
            data_used_gb=float(x["data_used_gb"]), roaming_enabled=bool(x["roaming_enabled"]),
        )  # fmt: skip

    return Customer(
        customer_id=record["customer_id"], full_name=record["full_name"],
        date_of_birth=record["date_of_birth"], phone_number=record["phone_number"],
        lines=[line(lines[i]) for i in record["line_ids"] if i in lines],
        bills=[
            Bill(bill_id=b["bill_id"], status=b["status"], total_due=float(b["total_due"]),
                 due_date=str(b["due_date"]))
            for b in (bills[i] for i in record["bill_ids"] if i in bills)
        ],
    )  # fmt: skip


def _mentions(text: str, customer: Customer) -> bool:
    found = set(ID.findall(text))
    names = {customer.customer_id, customer.phone_number}
    names |= {x.line_id for x in customer.lines} | {x.phone_number for x in customer.lines}
    return bool(found & names) or customer.full_name in text
