"""Grounding on the real retail database: entities that fit each tool, actions schemas that
admit only grounded ids, and seed train tasks mutated onto other users (their replays in an
`EnvPool`'s limited children, where a hostile call is stopped)."""

from __future__ import annotations

import importlib
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from sentinel.envs.base import Environment
from sentinel.envs.episodes import EnvPool
from sentinel.envs.grounding import actions_schema, ground, mutate
from sentinel.envs.pack import DomainPack, GroundingUnsupported
from sentinel.envs.registry import load, named
from sentinel.envs.tau2.env import Tau2Env
from sentinel.envs.tau2.retail.entities import Grounding
from sentinel.schemas import Action, Origin, Task, ToolCall
from tests.envs.test_sandbox import sandbox_pids
from tests.ticking import ticking

STATUSES = {
    "cancel_pending_order": {"pending"},
    "modify_pending_order_items": {"pending"},
    "modify_pending_order_address": {"pending", "pending (item modified)"},
    "modify_pending_order_payment": {"pending", "pending (item modified)"},
    "return_delivered_order_items": {"delivered"},
    "exchange_delivered_order_items": {"delivered"},
}
WRITES = sorted([*STATUSES, "modify_user_address"])
SAMPLE = 15
FLOOR = 0.8  # mutations that must succeed in the sample (all retail train: 67/68)
TIMEOUT_S = 2.0  # the pools' wall clock per tool call


@pytest.fixture(scope="module")
def seeds(retail: Environment) -> list[Task]:
    """A sample of retail train tasks with gold writes."""
    with_writes = [t for t in retail.tasks("train") if _writes(t, retail)]
    return random.Random(0).sample(with_writes, SAMPLE)


@pytest.fixture(scope="module")
def mutations(retail: Environment, seeds: list[Task]) -> list[tuple[Task, Task | None]]:
    async def run() -> list[tuple[Task, Task | None]]:
        async with EnvPool("retail", tool_timeout_s=TIMEOUT_S) as envs:
            return [
                (seed, await mutate(seed, retail, random.Random(i), envs=envs))
                for i, seed in enumerate(seeds)
            ]

    return anyio.run(run)


@pytest.fixture
async def envs() -> AsyncIterator[EnvPool]:
    """A pool for the replays that must leave no process behind."""
    async with EnvPool("retail", tool_timeout_s=TIMEOUT_S) as pool:
        yield pool
    assert sandbox_pids(pool.id) == []


def _writes(task: Task, domain: Environment) -> list[Any]:
    return [a for a in task.actions if a.name in domain.write_tools]


def _run(domain: Environment, task: Task, calls: list[tuple[str, dict[str, Any]]]) -> Any:
    """The episode after `calls` on a fresh environment, and their results."""
    episode = domain.episode(task)
    results = [
        episode.step(ToolCall(id=str(i), name=n, arguments=a)) for i, (n, a) in enumerate(calls)
    ]
    return episode, results


def _conforms(schema: dict[str, Any], value: Any) -> bool:
    """The JSON schema subset actions_schema uses (jsonschema when it is installed)."""
    try:
        jsonschema = importlib.import_module("jsonschema")
    except ImportError:
        return _subset(schema, value)
    return bool(jsonschema.Draft202012Validator(schema).is_valid(value))


def _subset(schema: dict[str, Any], value: Any) -> bool:
    if "anyOf" in schema:
        return any(_subset(s, value) for s in schema["anyOf"])
    if "const" in schema and value != schema["const"]:
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if schema.get("type") == "array":
        size = schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value))
        return size and all(_subset(schema["items"], v) for v in value)
    if schema.get("type") == "object":
        keys = set(value) if isinstance(value, dict) else set()
        if not set(schema["required"]) <= keys or not keys <= set(schema["properties"]):
            return False
        return all(_subset(schema["properties"][k], v) for k, v in value.items())
    return not isinstance(value, str) or len(value) <= schema.get("maxLength", len(value))


# --- ground -------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", WRITES)
def test_ground_gives_entities_each_write_tool_can_act_on(retail: Environment, tool: str) -> None:
    grounding = ground(retail, [tool], random.Random(3))
    db = retail.database
    user = db["users"][grounding.user.user_id]
    assert grounding.user.email == user["email"]
    assert {o.order_id for o in grounding.orders} <= set(user["orders"])
    if tool in STATUSES:
        assert any(o.status in STATUSES[tool] for o in grounding.orders), tool
    for product in grounding.products:
        variants = db["products"][product.product_id]["variants"]
        assert all(variants[v.item_id]["available"] for v in product.alternatives)
    # the schema's first choice for the tool runs on a fresh episode
    call = _first_choice(actions_schema(retail, grounding, [tool]), tool)
    _, results = _run(retail, retail.tasks("train")[0], [call])
    assert not results[0].error, (call, results[0].content)


def _first_choice(schema: dict[str, Any], tool: str) -> tuple[str, dict[str, Any]]:
    """The tool's call made of each argument's first allowed value."""
    branch = next(b for b in schema["items"]["anyOf"] if b["properties"]["name"]["const"] == tool)
    arguments: dict[str, Any] = {}
    for name, prop in branch["properties"]["arguments"]["properties"].items():
        if prop["type"] == "array":
            arguments[name] = [prop["items"]["enum"][0]]
        elif "enum" in prop:
            arguments[name] = prop["enum"][0]
        else:
            arguments[name] = {"zip": "10001", "state": "NY"}.get(name, "1 Main Street")
    return tool, arguments


def test_ground_is_deterministic_and_avoids_test_users(retail: Environment) -> None:
    tools = ["cancel_pending_order", "exchange_delivered_order_items"]
    first = ground(retail, tools, random.Random(11))
    assert first == ground(retail, tools, random.Random(11))
    statuses = {o.status for o in first.orders}
    assert {"pending", "delivered"} <= statuses
    test_users = {a.arguments.get("user_id") for t in retail.tasks("test") for a in t.actions}
    users = {ground(retail, tools, random.Random(seed)).user.user_id for seed in range(20)}
    assert len(users) > 5
    assert not users & test_users


def test_describe_is_short_and_names_every_grounded_id(retail: Environment) -> None:
    grounding = ground(retail, sorted(retail.write_tools), random.Random(5))
    text = grounding.describe()
    assert len(text) < 3000, len(text)  # a few hundred tokens
    assert grounding.user.email in text
    assert all(o.order_id in text for o in grounding.orders)
    assert all(v.item_id in text for p in grounding.products for v in p.alternatives)


def test_ground_raises_when_nothing_fits_or_the_domain_is_unsupported() -> None:
    no_pending = Tau2Env(named("retail"))  # not load's shared instance: its database changes
    db = no_pending.database
    orders = {k: o for k, o in db["orders"].items() if "pending" not in o["status"]}
    users = {
        uid: {**u, "orders": [o for o in u["orders"] if o in orders]}
        for uid, u in db["users"].items()
    }
    no_pending.__dict__["database"] = {**db, "orders": orders, "users": users}
    with pytest.raises(GroundingUnsupported, match="fit"):
        ground(no_pending, ["cancel_pending_order"], random.Random(0))
    assert ground(no_pending, ["return_delivered_order_items"], random.Random(0))
    bare = Tau2Env(named("mock"))  # a domain whose pack has no grounder

    class Bare(DomainPack):
        name = "mock"

    bare.pack = Bare()
    with pytest.raises(GroundingUnsupported, match="the mock pack has no grounder"):
        ground(bare, ["create_task"], random.Random(0))


# --- actions_schema -----------------------------------------------------------------------


def _gold(grounding: Grounding) -> list[dict[str, Any]]:
    """A correct action list: find the user, cancel a pending order, exchange an item."""
    u = grounding.user
    pending = next(o for o in grounding.orders if o.status == "pending")
    delivered = next(o for o in grounding.orders if o.status == "delivered")
    item, new = next(
        (i, v)
        for i in delivered.items
        for p in grounding.products
        if p.product_id == i.product_id
        for v in p.alternatives
        if v.item_id != i.item_id
    )
    cards = [m.id for m in u.payment_methods if m.balance is None]  # no balance to run out
    payer = (cards or [u.payment_methods[0].id])[0]
    return [
        {"name": "find_user_id_by_name_zip",
         "arguments": {"first_name": u.first_name, "last_name": u.last_name, "zip": u.zip}},
        {"name": "get_order_details", "arguments": {"order_id": delivered.order_id}},
        {"name": "cancel_pending_order",
         "arguments": {"order_id": pending.order_id, "reason": "ordered by mistake"}},
        {"name": "exchange_delivered_order_items",
         "arguments": {"order_id": delivered.order_id, "item_ids": [item.item_id],
                       "new_item_ids": [new.item_id], "payment_method_id": payer}},
    ]  # fmt: skip


def test_actions_schema_admits_grounded_ids_only(retail: Environment) -> None:
    tools = ["cancel_pending_order", "exchange_delivered_order_items"]
    grounding = ground(retail, tools, random.Random(2))
    schema = actions_schema(retail, grounding, tools)
    gold = _gold(grounding)
    assert _conforms(schema, gold)
    other = next(o for o in retail.database["orders"] if o not in str(gold))
    wrong: list[tuple[int, str, Any]] = [
        (2, "order_id", other),  # an order outside the grounding
        (3, "new_item_ids", [gold[3]["arguments"]["item_ids"][0]]),  # not an alternative
        (3, "payment_method_id", "credit_card_0000000"),
        (2, "reason", "too expensive"),
        (0, "zip", "00000"),
    ]
    for index, key, value in wrong:
        bad = [dict(a, arguments=dict(a["arguments"])) for a in gold]
        bad[index]["arguments"][key] = value
        assert not _conforms(schema, bad), (key, value)
    extra = [*gold[:3], {**gold[3], "arguments": {**gold[3]["arguments"], "note": "x"}}]
    assert not _conforms(schema, extra)
    assert not _conforms(schema, [{"name": "modify_user_address", "arguments": {}}])
    assert not _conforms(schema, [])


def test_schema_valid_actions_run(retail: Environment) -> None:
    tools = ["cancel_pending_order", "exchange_delivered_order_items"]
    grounding = ground(retail, tools, random.Random(2))
    calls = [(a["name"], a["arguments"]) for a in _gold(grounding)]
    _episode, results = _run(retail, retail.tasks("train")[0], calls)
    assert not any(r.error for r in results), [r.content for r in results]


# --- mutate -------------------------------------------------------------------------------


def test_most_seed_tasks_mutate(mutations: list[tuple[Task, Task | None]]) -> None:
    done = sum(m is not None for _, m in mutations)
    print(f"mutated {done}/{len(mutations)} sampled retail train tasks")
    assert done >= FLOOR * len(mutations)


def test_mutated_gold_writes_succeed_and_change_the_database(
    retail: Environment, mutations: list[tuple[Task, Task | None]]
) -> None:
    for seed, task in mutations:
        if task is None:
            continue
        writes = _writes(task, retail)
        assert writes, task.id
        calls = [(a.name, a.arguments) for a in task.actions]
        fresh = retail.episode(task)
        initial = fresh.db_hashes()
        episode, results = _run(retail, task, calls)
        failed = [(c, r.content) for c, r in zip(calls, results, strict=True) if r.error]
        assert not failed, (seed.id, failed)
        after = episode.db_hashes()
        assert after != initial, task.id
        assert after == retail.gold_hashes(task)
        assert after != retail.gold_hashes(seed), task.id


def test_mutated_tasks_use_new_entities_and_provenance(
    retail: Environment, mutations: list[tuple[Task, Task | None]]
) -> None:
    for seed, task in mutations:
        if task is None:
            continue
        assert task.id.startswith(f"{seed.id}-mut-")
        assert task.id != seed.id
        assert task.provenance.origin == Origin.MUTATED
        assert task.provenance.generation == seed.provenance.generation + 1
        old = {a.arguments.get("order_id") for a in _writes(seed, retail)} - {None}
        new = {a.arguments.get("order_id") for a in _writes(task, retail)} - {None}
        assert not old & new, (seed.id, old & new)
        instructions = task.spec.user_scenario.instructions
        assert not isinstance(instructions, str)
        old_user = next(iter(_users(retail, seed)))
        new_user = next(iter(_users(retail, task)))
        assert old_user != new_user
        name = retail.database["users"][new_user]["name"]["first_name"]
        assert name in (instructions.known_info or ""), instructions.known_info
        assert old_user not in task.spec.user_scenario.model_dump_json()
        assert old_user not in task.spec.evaluation_criteria.model_dump_json()  # type: ignore[union-attr]


def _users(domain: Environment, task: Task) -> set[str]:
    """The users whose orders or profile the task's gold writes change."""
    orders = domain.database["orders"]
    writes = _writes(task, domain)
    by_order = {
        orders[a.arguments["order_id"]]["user_id"] for a in writes if "order_id" in a.arguments
    }
    return by_order or {a.arguments["user_id"] for a in writes}


@pytest.mark.anyio
async def test_mutation_is_deterministic_for_a_seeded_rng(
    retail: Environment, seeds: list[Task], envs: EnvPool
) -> None:
    seed = seeds[0]
    first, second = [await mutate(seed, retail, random.Random(42), envs=envs) for _ in range(2)]
    assert first is not None
    assert second is not None
    assert first.id == second.id
    assert first.spec == second.spec


@pytest.mark.anyio
async def test_mutation_focuses_on_the_pattern_tools_and_recomputes_the_refund(
    retail: Environment, envs: EnvPool
) -> None:
    seed = next(t for t in retail.tasks("train") if t.id == "retail-16")  # cancels + a return
    task = await mutate(seed, retail, random.Random(7), ["cancel_pending_order"], envs=envs)
    assert task is not None
    writes = _writes(task, retail)
    assert {a.name for a in writes} == {"cancel_pending_order"}
    orders = retail.database["orders"]
    paid = sum(
        p["amount"] for a in writes for p in orders[a.arguments["order_id"]]["payment_history"]
    )
    assert task.spec.evaluation_criteria.communicate_info == [f"{paid:.2f}"]  # type: ignore[union-attr]
    assert "8276.23" not in task.spec.model_dump_json()  # the seed's amount


@pytest.mark.anyio
async def test_mutate_gives_none_when_nothing_fits(retail: Environment, envs: EnvPool) -> None:
    reads_only = next(t for t in retail.tasks("train") if not _writes(t, retail))
    assert await mutate(reads_only, retail, random.Random(0), envs=envs) is None
    with pytest.raises(ValueError, match="pool cannot replay"):
        await mutate(reads_only, load(named("retail")), random.Random(0), envs=EnvPool("telecom"))


@pytest.mark.anyio
async def test_a_seed_whose_gold_overruns_the_limits_is_stopped_and_the_next_mutates(
    retail: Environment, envs: EnvPool
) -> None:
    """Issue 19, 1: mutation replayed a seed's gold in this process, where retail's
    `calculate("9**9**9")` holds the GIL for minutes; now it is stopped at the pool's wall
    clock, the seed gives no mutation (and is not replayed again), and the loop ran all along."""
    seed = next(t for t in retail.tasks("train") if t.id == "retail-16")
    bomb = Action(action_id="bomb", name="calculate", arguments={"expression": "9**9**9"})
    criteria = seed.spec.evaluation_criteria
    assert criteria is not None
    armed = criteria.model_copy(update={"actions": [bomb, *seed.actions]})
    hostile = seed.model_copy(
        update={"spec": seed.spec.model_copy(update={"evaluation_criteria": armed})}
    )
    assert hostile.actions[0] == bomb

    async def stopped() -> Task | None:
        with anyio.fail_after(TIMEOUT_S + 30):  # the child's start-up, then the wall clock
            return await mutate(hostile, retail, random.Random(7), envs=envs)

    mutated, ticks = await ticking(stopped)
    assert mutated is None
    assert ticks.kept_up(), ticks  # the event loop kept running
    began = time.monotonic()
    assert await mutate(hostile, retail, random.Random(7), envs=envs) is None
    assert time.monotonic() - began < 0.5  # remembered: no second stop
    task = await mutate(seed, retail, random.Random(7), envs=envs)  # on a fresh child
    assert task is not None
    assert _writes(task, retail)
