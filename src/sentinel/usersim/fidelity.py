"""How faithful a user simulator is: scripted agent turns on tasks, and checks on the replies.

Each task's gold-action dialogue (see `dialogues`) is cut after the agent's greeting, its
question about a fact the user lacks, its request for identification, its first
confirmation and its closing; the simulator writes the next user turn to each. Rules decide
every check; an optional LLM judge (`usersim.judge`) only re-reads turns whose role the rules
cannot settle. A simulator that stops early, never stops, plays the agent, recites its
instructions or invents facts poisons RL (EigenData), so RL can refuse to start below
`usersim.min_fidelity` (`gate`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anyio
from pydantic import BaseModel, Field
from rich.table import Table

from sentinel.agents.llm import (
    ChatClient,
    LLMError,
    MalformedOutput,
    OpenAIChatClient,
    complete_structured,
)
from sentinel.agents.user import STOP_TOKENS, User, UserSimulator
from sentinel.config import Settings
from sentinel.logs import get_logger
from sentinel.schemas import ChatMessage, Task
from sentinel.schemas.message import utc_now
from sentinel.usersim.dialogues import STOP, Dialogue, Stage, script
from sentinel.usersim.rules import role_flip, well_formed, words
from sentinel.usersim.scenario import Scenario

if TYPE_CHECKING:
    from sentinel.envs.base import Environment

SCRIPTED = "scripted"  # the report's model name for the scripted user

log = get_logger(__name__)

Check = Literal[
    "reveals_known", "withholds_unknown", "no_premature_stop", "stops_at_end",
    "no_role_flip", "no_verbatim_leak", "well_formed",
]  # fmt: skip
CHECKS: tuple[Check, ...] = (
    "reveals_known", "withholds_unknown", "no_premature_stop", "stops_at_end",
    "no_role_flip", "no_verbatim_leak", "well_formed",
)  # fmt: skip
STAGES: tuple[Stage, ...] = ("greeting", "withhold", "identify", "confirm", "close")
LEAK_WORDS = 8  # a shared run of this many words counts as reciting the instructions


def verbatim_leak(text: str, instructions: str, n: int = LEAK_WORDS) -> str | None:
    source = words(instructions)
    shared = {tuple(source[i : i + n]) for i in range(len(source) - n + 1)}
    said = words(text)
    for i in range(len(said) - n + 1):
        if tuple(said[i : i + n]) in shared:
            return f"recites the instructions: {' '.join(said[i : i + n])!r}"
    return None


def reveals(text: str, scenario: Scenario) -> str | None:
    """Whether the reply gives one of the identity facts; a scenario with none (mock's
    update tasks) has nothing to reveal, so no reply can fail it."""
    lowered = text.lower()
    if not scenario.identity or any(
        re.search(rf"\b{re.escape(v.lower())}\b", lowered) for v in scenario.identity
    ):
        return None
    return f"reveals none of {scenario.identity}"


def withholds(text: str, scenario: Scenario) -> str | None:
    kind = scenario.withheld_kind
    if match := kind.value.search(text):
        return f"makes up a {kind.name}: {match.group(0)!r}"
    return None


def stops(text: str) -> bool:
    return any(token in text for token in STOP_TOKENS)


def rule_checks(text: str, stage: Stage, scenario: Scenario) -> dict[Check, str | None]:
    """Every rule that applies to a reply at `stage`: check -> None (passed) or why not."""
    results: dict[Check, str | None] = {
        "well_formed": well_formed(text),
        "no_role_flip": role_flip(text),
        "no_verbatim_leak": verbatim_leak(text, scenario.text),
    }
    if stage == "close":
        results["stops_at_end"] = None if STOP in text else "does not stop when done"
    else:
        results["no_premature_stop"] = "stops before the task is done" if stops(text) else None
    if stage == "identify":
        results["reveals_known"] = reveals(text, scenario)
    if stage == "withhold":
        results["withholds_unknown"] = withholds(text, scenario)
    return results


class TurnResult(BaseModel):
    task_id: str
    stage: Stage
    reply: str
    failures: dict[str, str] = Field(default_factory=dict)  # check -> why it failed
    passed: list[str] = Field(default_factory=list)
    judged: str | None = None  # the LLM judge's verdict, when it was asked


class CheckFigure(BaseModel):
    check: str
    passed: int
    total: int
    rate: float | None  # None: no turn was subject to this check


class FidelityReport(BaseModel):
    model: str
    judge: str | None = None
    tasks: list[str]
    checks: list[CheckFigure]
    score: float  # the mean rate over the checks that had turns
    turns: list[TurnResult]
    created_at: datetime = Field(default_factory=utc_now)

    def figure(self, check: str) -> CheckFigure:
        return next(f for f in self.checks if f.check == check)

    def worst(self) -> CheckFigure:
        rated = [f for f in self.checks if f.rate is not None]
        return min(rated, key=lambda f: f.rate or 0.0)


def summarise(
    model: str, tasks: Sequence[str], turns: list[TurnResult], judge: str | None = None
) -> FidelityReport:
    figures = []
    for check in CHECKS:
        passed = sum(check in t.passed for t in turns)
        total = passed + sum(check in t.failures for t in turns)
        figures.append(CheckFigure(check=check, passed=passed, total=total,
                                   rate=passed / total if total else None))  # fmt: skip
    rates = [f.rate for f in figures if f.rate is not None]
    return FidelityReport(
        model=model, judge=judge, tasks=list(tasks), checks=figures,
        score=sum(rates) / len(rates) if rates else 0.0, turns=turns,
    )  # fmt: skip


class Speaker(BaseModel):
    """The judge's reading of who wrote a message."""

    speaker: Literal["customer", "agent"]


JUDGE_PROMPT = (
    "Below is the last part of a customer-service chat. The final message was meant to be "
    "written by the CUSTOMER. Did the customer write it, or does it read as if the "
    'service agent wrote it? Answer as JSON: {"speaker": "customer"} or {"speaker": "agent"}.'
)


async def ask_judge(judge: ChatClient, history: list[ChatMessage], reply: str) -> str | None:
    """'agent' or 'customer'; None when the judge failed (the rules' verdict stands)."""
    lines = [f"{'AGENT' if m.role == 'assistant' else 'CUSTOMER'}: {m.content}"
             for m in history[-2:]]  # fmt: skip
    lines.append(f"FINAL MESSAGE: {reply}")
    messages = [{"role": "system", "content": JUDGE_PROMPT},
                {"role": "user", "content": "\n".join(lines)}]  # fmt: skip
    try:
        verdict = await complete_structured(judge, messages, Speaker, max_tokens=16)
    except LLMError as error:
        log.warning("fidelity judge failed", error=str(error))
        return None
    return verdict.speaker


class Prober:
    """Runs the probes of many tasks concurrently against one simulator."""

    def __init__(
        self, user: User, domain: Environment, *, judge: ChatClient | None,
        concurrency: int,
    ) -> None:  # fmt: skip
        self.user = user
        self.domain = domain
        self.judge = judge
        self.limiter = anyio.CapacityLimiter(concurrency)

    async def run(self, tasks: Sequence[Task]) -> list[TurnResult]:
        dialogues = [script(t, self.domain.write_tools) for t in tasks]
        prompts = {t.id: self.domain.user_prompt(t) for t in tasks}
        results: list[TurnResult] = []

        async def one(dialogue: Dialogue, stage: Stage) -> None:
            async with self.limiter:
                results.append(await self.probe(dialogue, stage, prompts[dialogue.task.id]))

        async with anyio.create_task_group() as tg:
            for dialogue in dialogues:
                for stage in STAGES:
                    tg.start_soon(one, dialogue, stage)
        keys = [(t.id, s) for t in tasks for s in STAGES]
        order = {key: i for i, key in enumerate(keys)}
        return sorted(results, key=lambda r: order[(r.task_id, r.stage)])

    async def probe(self, dialogue: Dialogue, stage: Stage, prompt: str) -> TurnResult:
        history = dialogue.prefix(stage)
        try:
            reply = (await self.user.reply(prompt, history, dialogue.task)).content or ""
        except MalformedOutput as error:  # too long to be a turn: the rules fail it
            reply = error.raw
        results = rule_checks(reply, stage, dialogue.scenario)
        judged = None
        if self.judge is not None and results["no_role_flip"] is None and "?" in reply:
            judged = await ask_judge(self.judge, history, reply)  # the rules cannot tell
            if judged == "agent":
                results["no_role_flip"] = "the judge reads it as the agent's"
        return TurnResult(
            task_id=dialogue.task.id, stage=stage, reply=reply, judged=judged,
            failures={c: why for c, why in results.items() if why is not None},
            passed=[c for c, why in results.items() if why is None],
        )  # fmt: skip


async def check_fidelity(
    settings: Settings, tasks: Sequence[Task], client: ChatClient | None
) -> FidelityReport:
    """Probe the simulator behind `client` on `tasks` (None: the scripted user,
    agents.scripted_user), and record the report in the run."""
    from sentinel.agents.scripted_user import ScriptedUser
    from sentinel.envs.registry import load, named

    domain = load(named(tasks[0].domain) if tasks else settings.env)
    rollout = settings.rollout.model_copy(update={"user_max_tokens": settings.usersim.max_tokens})
    user: User = ScriptedUser(domain) if client is None else UserSimulator(client, rollout)
    endpoint = settings.usersim.judge
    judge = OpenAIChatClient(endpoint) if endpoint is not None else None
    try:
        prober = Prober(user, domain, judge=judge, concurrency=settings.usersim.concurrency)
        turns = await prober.run(tasks)
    finally:
        if judge is not None:
            await judge.aclose()
    name = SCRIPTED if client is None else client.model
    report = summarise(name, [t.id for t in tasks], turns, endpoint.model if endpoint else None)
    path = save_report(report, settings.run_dir)
    log.info(
        "user simulator checked", model=report.model, score=round(report.score, 3), path=str(path)
    )
    return report


def save_report(report: FidelityReport, run_dir: Path) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", report.model)
    path = run_dir / "usersim" / f"fidelity-{safe}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.model_dump_json(indent=2))
    return path


def render_table(*reports: FidelityReport) -> Table:
    """One column per report (e.g. before and after a fine-tune), one row per check."""
    table = Table(title="user simulator fidelity")
    table.add_column("check")
    for report in reports:
        table.add_column(report.model, justify="right")
    for check in CHECKS:
        table.add_row(check, *(_cell(r.figure(check)) for r in reports))
    table.add_row("[bold]score[/]", *(f"[bold]{r.score:.2f}[/]" for r in reports))
    return table


def _cell(figure: CheckFigure) -> str:
    if figure.rate is None:
        return "-"
    return f"{figure.rate:.2f} ({figure.passed}/{figure.total})"


class FidelityTooLow(RuntimeError):
    """The user simulator is below `usersim.min_fidelity`: RL on it would learn its errors."""


def check_tasks(settings: Settings) -> list[Task]:
    """The last `usersim.check_tasks` train tasks: the user-model fine-tune never sees them."""
    from sentinel.envs.registry import load

    return load(settings.env).tasks("train")[-settings.usersim.check_tasks :]


async def gate(settings: Settings) -> None:
    """Raise FidelityTooLow when `usersim.min_fidelity` is set and the simulator falls short."""
    threshold = settings.usersim.min_fidelity
    if threshold is None:
        return
    client = OpenAIChatClient(settings.llm.user_sim)
    try:
        report = await check_fidelity(settings, check_tasks(settings), client)
    finally:
        await client.aclose()
    if report.score < threshold:
        worst = report.worst()
        raise FidelityTooLow(
            f"user simulator {report.model!r} has fidelity {report.score:.2f}, below "
            f"usersim.min_fidelity {threshold:.2f} (worst check: {worst.check} "
            f"{worst.rate or 0:.2f}); see {settings.run_dir / 'usersim'}. Fine-tune it with "
            "`sentinel usersim finetune` and set llm.user_sim.model to the adapter it prints, "
            "or lower usersim.min_fidelity."
        )
