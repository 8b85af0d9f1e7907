"""The telecom pack: its state rules as tau2's tools enforce them, its entities, its lean
prompt (measured with SmolLM2's tokenizer) and where the Solver gets it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sentinel.agents.rollout import RolloutRunner
from sentinel.config import Settings
from sentinel.envs.base import Environment
from sentinel.envs.grounding import ground
from sentinel.envs.registry import named, pack
from sentinel.schemas import ToolCall
from tests.envs.tau2.telecom.test_grounding import blank_task


@pytest.mark.parametrize(("tool", "allowed"), [("suspend_line", "Active"),
                                               ("resume_line", "Suspended")])  # fmt: skip
def test_each_rule_is_what_the_tool_enforces(telecom: Environment, tool: str, allowed: str) -> None:
    rule = telecom.pack.rule(tool)
    assert rule is not None
    status = telecom.entities.status
    lines = {s: next(line for line, v in status.items() if v == s and line.startswith("L"))
             for s in ("Active", "Suspended")}  # fmt: skip
    customer = {"L1004": "C1002", "L1009": "C1003", "L1001": "C1001", "L1003": "C1001"}
    for state, line in lines.items():
        episode = telecom.episode(blank_task(telecom))
        arguments = {"customer_id": customer[line], "line_id": line, "reason": "travel"}
        if tool == "resume_line":
            arguments.pop("reason")
        result = episode.step(ToolCall(id="w", name=tool, arguments=arguments))
        assert rule.allows(state) == (state == allowed) == (not result.error), (state, result)


def test_entities_index_telecoms_list_tables(telecom: Environment) -> None:
    entities = telecom.entities
    assert {"C1002", "L1009", "B1005", "P1001"} <= entities.ids
    assert entities.status["L1009"] == "Suspended"
    assert entities.status["B1005"] == "Overdue"


def test_phrasing_finds_telecom_identities() -> None:
    phrasing = pack("telecom").phrasing
    known = "You are John Smith with phone number 555-123-2002."
    phone = phrasing.kinds[-1]
    assert phone.mention.search(known)
    assert phone.value.search(known)
    assert phrasing.user_id.search("customer id C1001")
    assert set(phrasing.openings) == {
        "suspend_line", "resume_line", "enable_roaming", "disable_roaming", "refuel_data",
        "send_payment_request",
    }  # fmt: skip


def tokens(tokenizer: object, policy: str, tools: list[dict[str, object]]) -> int:
    encode = tokenizer.encode  # type: ignore[attr-defined]
    return len(encode(policy)) + sum(len(encode(json.dumps(t))) for t in tools)


def test_lean_prompt_fits_smollm2_with_room_and_keeps_the_tools_callable(
    telecom: Environment, model_dir: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lean = telecom.pack
    full = tokens(tokenizer, telecom.policy, telecom.tool_schemas)
    small = tokens(
        tokenizer, lean.lean_policy(telecom.policy), lean.lean_tools(telecom.tool_schemas)
    )
    assert full > 7500  # tau2's prompt alone all but fills SmolLM2's 8,192 tokens
    assert small < 3000
    for before, after in zip(
        telecom.tool_schemas, lean.lean_tools(telecom.tool_schemas), strict=True
    ):
        b, a = before["function"], after["function"]
        assert a["name"] == b["name"]
        assert a["parameters"]["required"] == b["parameters"]["required"]
        assert {k: v["type"] for k, v in a["parameters"]["properties"].items()} == {
            k: v["type"] for k, v in b["parameters"]["properties"].items()
        }
    assert "Telecom Agent Policy" in telecom.policy  # the text it condenses is tau2's
    assert pack("retail").lean_policy("the policy") == "the policy"  # others: unchanged


def test_the_solver_gets_the_lean_prompt_only_when_configured(telecom: Environment) -> None:
    settings = Settings(env=named("telecom"))
    full = RolloutRunner.from_settings(settings, telecom)
    lean_settings = settings.model_copy(
        update={"rollout": settings.rollout.model_copy(update={"lean_prompt": True})}
    )
    lean = RolloutRunner.from_settings(lean_settings, telecom)
    assert telecom.policy in full.solver.system_prompt
    assert "(condensed)" in lean.solver.system_prompt
    assert len(lean.solver.system_prompt) < len(full.solver.system_prompt) / 3
    assert full.user.tools  # the phone, both ways
    assert full.user.tools == lean.user.tools


def test_configs_local_asks_for_the_lean_prompt_and_the_gpu_profiles_do_not() -> None:
    root = Path(__file__).parents[4] / "configs"
    assert "lean_prompt: true" in (root / "local.yaml").read_text()
    for other in root.glob("*.yaml"):
        if other.name != "local.yaml":
            assert "lean_prompt: true" not in other.read_text(), other.name


def test_grounding_describes_the_line_the_user_identifies_with(telecom: Environment) -> None:
    g = ground(telecom, ["enable_roaming"], random.Random(0))
    assert "roaming off" in g.describe()
    phone = g.identity().rsplit(" ", 1)[-1].rstrip(".")
    assert phone in g.describe()
