"""The error-pattern library on a real Redis: merging, idempotence, concurrency, trends."""

from __future__ import annotations

import anyio
import pytest

from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.patterns import PatternLibrary, overlapping
from sentinel.schemas import FailureCategory, FailureDiagnosis

pytestmark = pytest.mark.anyio


def diagnosis(
    i: int,
    category: FailureCategory = FailureCategory.WRONG_ARGUMENTS,
    tools: tuple[str, ...] = ("modify_pending_order_items",),
    version: int = 0,
    kind: str | None = None,
) -> FailureDiagnosis:
    return FailureDiagnosis(
        id=f"d-{i}",
        trajectory_id=f"t-{i}",
        task_id="retail-1",
        policy_version=version,
        category=category,
        summary="The agent passed the old item id as the new one.",
        tools=list(tools),
        kind=kind,
    )


@pytest.fixture
def library(bus: Bus) -> PatternLibrary:
    return PatternLibrary(bus.redis, bus.settings.prefix, merge_similarity=0.5)


async def test_similar_diagnoses_merge_and_others_found_patterns(library: PatternLibrary) -> None:
    first = await library.add(diagnosis(0))
    same = await library.add(diagnosis(1))
    assert first.created
    assert not same.created
    assert same.pattern.id == first.pattern.id
    assert same.pattern.example_trajectory_ids == ["t-0", "t-1"]
    other_tool = await library.add(diagnosis(2, tools=("cancel_pending_order",)))
    other_category = await library.add(diagnosis(3, category=FailureCategory.MISSING_ACTION))
    assert other_tool.created
    assert other_category.created
    patterns = await library.all()
    assert [sum(p.frequency.values()) for p in patterns] == [2, 1, 1]
    assert patterns[0].title == "wrong arguments in modify_pending_order_items"


async def test_a_new_kind_of_error_founds_its_own_pattern_and_names_it(
    library: PatternLibrary,
) -> None:
    """The same category and tools, but a kind the Controller's LLM named: a pattern apart,
    titled by the kind; the same kind again joins it."""
    plain = await library.add(diagnosis(0))
    named = await library.add(diagnosis(1, kind="swaps_old_and_new_item"))
    again = await library.add(diagnosis(2, kind="swaps_old_and_new_item"))
    assert named.created
    assert named.pattern.id != plain.pattern.id
    assert again.pattern.id == named.pattern.id
    assert named.pattern.kind == "swaps_old_and_new_item"
    assert named.pattern.title == "swaps old and new item in modify_pending_order_items"


async def test_a_pattern_carries_its_newest_failures_for_the_proposer(
    library: PatternLibrary,
) -> None:
    for i in range(5):
        excerpt = f"user: please change item {i}\nwrong step: assistant calls modify"
        await library.add(diagnosis(i).model_copy(update={"excerpt": excerpt}))
    [pattern] = await library.all()
    assert [e.trajectory_id for e in pattern.evidence] == ["t-2", "t-3", "t-4"]
    assert pattern.evidence[-1].excerpt is not None
    assert "item 4" in pattern.evidence[-1].excerpt
    assert pattern.evidence[-1].summary == "The agent passed the old item id as the new one."


async def test_a_diagnosis_counts_once_even_when_redelivered(library: PatternLibrary) -> None:
    await library.add(diagnosis(0))
    again = await library.add(diagnosis(0))
    assert not again.counted
    assert again.pattern.frequency == {0: 1}
    assert await library.failures() == {0: 1}


async def test_concurrent_controllers_lose_no_count(library: PatternLibrary) -> None:
    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(library.add, diagnosis(i, version=i % 2))
    [pattern] = await library.all()
    assert pattern.frequency == {0: 10, 1: 10}


async def test_trend_is_the_share_of_failures_per_policy_version(library: PatternLibrary) -> None:
    for i in range(4):  # version 0: 3 of 4 failures are this pattern
        tools = ("cancel_pending_order",) if i == 3 else ("modify_pending_order_items",)
        await library.add(diagnosis(i, tools=tools, version=0))
    for i in range(4, 8):  # version 1: 1 of 4
        tools = ("cancel_pending_order",) if i != 4 else ("modify_pending_order_items",)
        await library.add(diagnosis(i, tools=tools, version=1))
    pattern = next(p for p in await library.all() if "modify" in p.tools[0])
    assert await library.trend(pattern) == {0: 0.75, 1: 0.25}


async def test_a_merged_pattern_sums_its_counts_and_absorbs_the_others_kind(
    library: PatternLibrary,
) -> None:
    """The Controller judged two patterns one weakness: the more frequent absorbs the other,
    per-version counts add up, and a later diagnosis of the other's kind joins the merged
    pattern instead of founding a new one."""
    kept = await library.add(diagnosis(0, version=0))
    await library.add(diagnosis(1, version=1))
    other = await library.add(diagnosis(2, version=1, kind="asks_for_known_info"))
    merged = await library.merge(kept.pattern.id, other.pattern.id)
    assert merged is not None
    assert merged.frequency == {0: 1, 1: 2}
    assert merged.absorbed == ["wrong_arguments/asks_for_known_info"]
    assert [e.trajectory_id for e in merged.evidence] == ["t-2", "t-0", "t-1"]
    assert [p.id for p in await library.all()] == [kept.pattern.id]
    assert await library.merged() == {other.pattern.id: kept.pattern.id}
    again = await library.add(diagnosis(3, kind="asks_for_known_info"))
    assert again.pattern.id == kept.pattern.id
    assert not again.created
    assert await library.merge(kept.pattern.id, other.pattern.id) is None  # gone already
    assert await library.merge(kept.pattern.id, kept.pattern.id) is None


async def test_patterns_whose_tools_grew_together_merge_deterministically(
    library: PatternLibrary,
) -> None:
    """Founded apart (their tools overlapped by less than the threshold), two patterns of one
    category whose tools have since converged are one pattern for the fallback; one of
    another category never is."""
    a = await library.add(diagnosis(0, tools=("get_order_details", "cancel_pending_order")))
    b = await library.add(diagnosis(1, tools=("exchange_delivered_order_items",)))
    for i in (2, 5):  # a is the more frequent: it absorbs
        await library.add(diagnosis(i, tools=("get_order_details", "cancel_pending_order")))
    await library.add(diagnosis(3, category=FailureCategory.MISSING_ACTION))
    assert len(await library.all()) == 3
    assert overlapping(await library.all(), 0.5) == []
    grown = diagnosis(4, tools=("exchange_delivered_order_items", "get_order_details"))
    await library.add(grown)  # joins b: now b's tools are half of a's
    pairs = overlapping(await library.all(), 0.3)
    assert [(x.id, y.id) for x, y in pairs] == [(a.pattern.id, b.pattern.id)]
