"""Telecom's grounder against real tau2 telecom (no LLM): real held-in customers, schemas that
offer only their ids, drafts that run, and seeds moved onto other customers."""

from __future__ import annotations

import random
from typing import Any

import pytest

from sentinel.envs.base import Environment
from sentinel.envs.episodes import EnvPool
from sentinel.envs.grounding import actions_schema, ground, grounder, mutate
from sentinel.envs.pack import GroundingUnsupported
from sentinel.envs.tau2.telecom.grounding import Grounding, TelecomGrounder
from sentinel.schemas import (
    Origin,
    Provenance,
    Task,
    TaskSpec,
    ToolCall,
    UserInstructions,
    UserScenario,
)

pytestmark = pytest.mark.anyio


def telecom_grounder(env: Environment) -> TelecomGrounder:
    chosen = grounder(env)
    assert isinstance(chosen, TelecomGrounder)
    return chosen


def test_test_split_customers_are_held_out(telecom: Environment) -> None:
    held = telecom_grounder(telecom).held_out
    assert "C1001" in held  # every tau2 telecom task is John Smith's (C1001, 555-123-2002)
    for task in telecom.tasks("test"):
        body = task.spec.model_dump_json()
        assert not any(c.customer_id in body for c in telecom_grounder(telecom).usable())


WRITES = ["suspend_line", "resume_line", "enable_roaming", "disable_roaming", "refuel_data",
          "send_payment_request"]  # fmt: skip


@pytest.mark.parametrize("tool", WRITES)
def test_ground_is_deterministic_and_never_uses_test_customers(
    telecom: Environment, tool: str
) -> None:
    held = telecom_grounder(telecom).held_out
    for seed in range(20):
        first = ground(telecom, [tool], random.Random(seed))
        assert first == ground(telecom, [tool], random.Random(seed))
        assert isinstance(first, Grounding)
        assert first.customer.customer_id not in held
        assert first.customer.customer_id in first.identity() or first.customer.full_name in (
            first.identity()
        )


def test_no_customer_fits_a_suspend_and_a_resume_at_once(telecom: Environment) -> None:
    with pytest.raises(GroundingUnsupported, match="no held-in customer"):
        ground(telecom, ["suspend_line", "resume_line"], random.Random(0))


def enums(schema: Any) -> set[str]:
    if isinstance(schema, dict):
        found = {v for v in schema.get("enum", []) if isinstance(v, str)}
        return found.union(*(enums(v) for v in schema.values()))
    if isinstance(schema, list):
        return set().union(*(enums(v) for v in schema))
    return set()


def test_schema_ids_exist_and_are_the_grounded_customers(telecom: Environment) -> None:
    for tool in sorted(telecom.write_tools):
        g = ground(telecom, [tool], random.Random(1))
        assert isinstance(g, Grounding)
        schema = actions_schema(telecom, g, [tool], 6)
        ids = {v for v in enums(schema) if v[:1] in "CLB" and v[1:].isdigit()}
        assert ids, tool
        assert ids <= telecom.entities.ids
        own = {g.customer.customer_id} | {x.line_id for x in g.customer.lines}
        assert ids <= own | {b.bill_id for b in g.customer.bills}


def first_choice(branch: dict[str, Any]) -> dict[str, Any]:
    """A draft's arguments picking each enum's first value (a text: a short reason)."""
    arguments = branch["properties"]["arguments"]["properties"]
    return {k: v["enum"][0] if "enum" in v else "requested by the customer"
            for k, v in arguments.items()}  # fmt: skip


def blank_task(env: Environment) -> Task:
    instructions = UserInstructions(
        domain=env.name, reason_for_call="help", task_instructions="Be brief."
    )
    spec = TaskSpec(id="grounded", user_scenario=UserScenario(instructions=instructions))
    provenance = Provenance(origin=Origin.SYNTHETIC, split="train")
    return Task(id="grounded", domain=env.name, spec=spec, provenance=provenance)


@pytest.mark.parametrize("seed", range(3))
def test_a_draft_of_valid_enum_values_runs_and_changes_the_database(
    telecom: Environment, seed: int
) -> None:
    for tool in sorted(telecom.write_tools):
        g = ground(telecom, [tool], random.Random(seed))
        schema = actions_schema(telecom, g, [tool], 4, lookups=False)
        (branch,) = schema["items"]["anyOf"]
        episode = telecom.episode(blank_task(telecom))
        before = episode.db_hashes()
        result = episode.step(ToolCall(id="w", name=tool, arguments=first_choice(branch)))
        assert not result.error, (tool, result.content)
        assert episode.db_hashes() != before, tool


async def test_mutate_moves_seeds_onto_held_in_customers(telecom: Environment) -> None:
    held = telecom_grounder(telecom).held_out
    seeds = telecom.tasks("train")[::9]
    moved = []
    async with EnvPool(telecom.settings) as envs:
        for i, seed in enumerate(seeds):
            task = await mutate(seed, telecom, random.Random(i), None, envs=envs)
            if task is not None:
                moved.append(task)
                body = task.spec.model_dump_json()
                assert not any(c in body for c in held), task.id
                assert "555-123-2002" not in body
                assert "Smith" not in body
                assert task.provenance.origin == "mutated"
                assert [a.name for a in task.actions] == [a.name for a in seed.actions]
    assert len(moved) >= len(seeds) - 2, [t.id for t in moved]
