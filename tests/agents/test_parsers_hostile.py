"""Every parser of LLM output against hostile text: random text, truncated or wrongly typed
JSON, control characters, lone surrogates, 1 MB answers and 10k-deep nesting.

Each one must end in its result or in a clear reason, never in an exception, and must never
take an invalid answer for a valid one. The completions are fed through each agent's real
code path (a scripted endpoint stands in for the model: error handling only); the Proposer's
verdicts go to the real Redis."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from sentinel.agents.controller import Controller, DiagnosisDraft
from sentinel.agents.llm import (
    MAX_JSON_DEPTH,
    MAX_OUTPUT_CHARS,
    Completion,
    MalformedOutput,
    RawToolCall,
    _json_text,
    parse_arguments,
    parse_structured,
)
from sentinel.agents.prompts import PromptBook
from sentinel.agents.proposer import Proposer, TaskDraft
from sentinel.agents.reflector import ReflectionDraft, Reflector, allowed_steps, decision_points
from sentinel.agents.signals import failure_signals, first_wrong_step
from sentinel.agents.solver import RESPOND, Solver
from sentinel.agents.user import parse_reply
from sentinel.config import ControllerSettings, LeafeSettings, ProposerSettings, RolloutSettings
from sentinel.envs.base import Environment
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.patterns import PatternLibrary
from sentinel.orchestrator.pool import TaskPool
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import (
    Envelope,
    ErrorPattern,
    FailureCategory,
    RejectionCode,
    TaskProposal,
    ValidationResult,
)
from sentinel.usersim.fidelity import Speaker, ask_judge
from tests import factories

pytestmark = pytest.mark.anyio
FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
REASON_CHARS = 500  # a reason quotes the output, it never is the output

# --- hostile text -----------------------------------------------------------------------------

HUGE = "x" * 1_000_000
HUGE_JSON = json.dumps({"summary": "y" * 1_000_000})
DEEP = "[" * 10_000 + "]" * 10_000
DEEP_OBJECT = '{"a":' * 10_000 + "1" + "}" * 10_000
WHITESPACE = "{" + " " * 200_000 + "x"  # quadratic for a regex with \s* before an anchor
SURROGATE = '{"content": "\\ud800"}'  # valid-looking JSON, unstorable text
ANY_CHAR = st.characters(exclude_categories=())  # controls, format chars, lone surrogates too
SCALARS = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
JSON = st.recursive(
    SCALARS | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
OBJECTS = st.dictionaries(st.text(max_size=8), JSON, max_size=4)
NOT_OBJECTS = JSON.filter(lambda v: not isinstance(v, dict))


def truncated(text: str, cut: int) -> str:
    return text[: min(cut, len(text) - 1)]


TEXT = st.one_of(
    st.text(ANY_CHAR, max_size=200),
    JSON.map(json.dumps),
    st.builds(truncated, OBJECTS.map(json.dumps), st.integers(0, 60)),
    st.builds(lambda v, p: f"{p}```json\n{json.dumps(v)}\n```{p}", JSON, st.text(max_size=9)),
    st.integers(33, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(33, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.sampled_from([HUGE, HUGE_JSON, DEEP, DEEP_OBJECT, WHITESPACE, SURROGATE, '{"a": NaN}']),
)  # fmt: skip

# --- valid drafts, and each one with a field made wrong ---------------------------------------

ACTION = {"name": "cancel_pending_order", "arguments": {"order_id": "#W1", "reason": "x"}}
VALID: dict[type[BaseModel], dict[str, Any]] = {
    DiagnosisDraft: {
        "category": "wrong_arguments", "first_wrong_step": 3, "summary": "Wrong order.",
        "evidence": ["cancel_pending_order(#W2)"], "tools": ["cancel_pending_order"],
    },
    ReflectionDraft: {"experience": "Check the order id with the user first.", "backtrack_step": 2},
    TaskDraft: {
        "lookups": [{"name": "get_order_details", "arguments": {"order_id": "#W1"}}],
        "writes": [ACTION], "reason_for_call": "Cancel it.", "known_info": "Order #W1.",
        "unknown_info": "", "task_instructions": "Be brief.", "persona": "Calm.",
    },
    Speaker: {"speaker": "customer"},
}  # fmt: skip
LISTS = {"evidence", "tools", "lookups", "writes"}
ACTION_LISTS = {"lookups", "writes"}
CONTAINERS = st.lists(JSON, max_size=2) | st.dictionaries(st.text(max_size=4), JSON, max_size=2)


@st.composite
def corrupted(draw: st.DrawFn, model: type[BaseModel]) -> tuple[str, str]:
    """A valid draft of `model` with one field made wrong; returns (JSON text, the field)."""
    draft = json.loads(json.dumps(VALID[model]))
    field = draw(st.sampled_from(sorted(draft)))
    how = draw(st.sampled_from(["type", "missing", "extra", "deep", "item"]))
    if how == "missing" and model.model_fields[field].is_required():
        del draft[field]
    elif how == "extra" and model.model_config.get("extra") == "forbid":  # Speaker ignores them
        field = draw(st.text(ANY_CHAR, min_size=1, max_size=30).filter(lambda k: k not in draft))
        draft[field] = draw(JSON)
    elif how == "deep":
        draft[field] = json.loads("[" * 40 + "]" * 40)
    elif how == "item" and field in ACTION_LISTS:
        bad = draw(st.sampled_from([
            {"name": draw(NOT_OBJECTS.filter(lambda v: not isinstance(v, str))), "arguments": {}},
            {"name": "get_order_details", "arguments": draw(NOT_OBJECTS)},
            {"name": "get_order_details", "arguments": {}, "requestor": "user"},
            "get_order_details",
        ]))  # fmt: skip
        draft[field] = [bad]
    elif field in LISTS:
        draft[field] = draw(st.dictionaries(st.text(max_size=4), JSON, max_size=2) | st.text())
    else:
        draft[field] = draw(CONTAINERS)
    text = json.dumps(draft, ensure_ascii=False).encode("utf-8", "replace").decode()
    return text, field


@pytest.mark.parametrize("model", list(VALID))
def test_the_valid_drafts_parse(model: type[BaseModel]) -> None:
    assert parse_structured(json.dumps(VALID[model]), model) == model.model_validate(VALID[model])


def rejected(text: str, model: type[BaseModel]) -> MalformedOutput | None:
    """The parser's reason for rejecting `text` as `model`, None if it accepted it."""
    error: MalformedOutput | None = None
    try:
        assert isinstance(parse_structured(text, model), model)
    except MalformedOutput as caught:
        error = caught
    if error is not None:
        assert error.problem.strip(), str(error)[:600]
        assert len(str(error)) <= REASON_CHARS, str(error)[:600]
        assert str(error).startswith(f"{model.__name__}: ")
    return error


@pytest.mark.parametrize("model", list(VALID))
@FAST
@given(text=TEXT)
@example(text=HUGE).via("1 MB")
@example(text=DEEP_OBJECT).via("10k deep")
def test_any_text_is_a_draft_or_a_reason(model: type[BaseModel], text: str) -> None:
    error = rejected(text, model)
    if text in (HUGE, HUGE_JSON, DEEP, DEEP_OBJECT, WHITESPACE):
        assert error is not None
        assert not error.retry


def test_nesting_is_measured_on_the_json_that_is_parsed() -> None:
    hidden = '"{"a":' + "[" * 5_000 + "]" * 5_000 + "}"  # the quote in front hides the brackets
    with pytest.raises(MalformedOutput, match="nested deeper than"):
        parse_structured(hidden, Speaker)


@pytest.mark.parametrize("model", list(VALID))
@FAST
@given(data=st.data())
def test_a_draft_with_a_wrong_field_is_rejected_naming_it(
    model: type[BaseModel], data: st.DataObject
) -> None:
    text, field = data.draw(corrupted(model))
    error = rejected(text, model)
    assert error is not None, f"accepted a draft with a wrong {field!r}: {text[:300]}"


# --- _json_text and tool arguments ------------------------------------------------------------


@FAST
@given(text=TEXT)
def test_the_json_inside_an_answer_is_a_part_of_it(text: str) -> None:
    assert _json_text(text) in text


def test_finding_the_json_is_linear_in_whitespace() -> None:
    started = time.monotonic()
    _json_text("{" + " " * 60_000 + "x")  # the regex it replaced took seconds on this
    assert time.monotonic() - started < 0.5


@FAST
@given(value=OBJECTS)
def test_object_arguments_parse_to_themselves(value: dict[str, Any]) -> None:
    assert parse_arguments(json.dumps(value)) == value


BAD_ARGUMENTS = st.one_of(
    NOT_OBJECTS.map(json.dumps),
    st.builds(truncated, OBJECTS.map(json.dumps), st.integers(0, 60)),
    st.text(ANY_CHAR, max_size=50).filter(lambda t: not t.strip().startswith("{")),
    st.integers(33, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.sampled_from([HUGE_JSON, DEEP_OBJECT, SURROGATE, '{"a": NaN}', '{"a": Infinity}']),
)


@FAST
@given(raw=BAD_ARGUMENTS)
def test_arguments_that_are_not_a_json_object_get_a_reason(raw: str) -> None:
    with pytest.raises(ValueError, match="arguments") as caught:
        parse_arguments(raw)
    assert len(str(caught.value)) <= REASON_CHARS


def reference_object(raw: str) -> dict[str, Any] | None:
    """What a strict parser of a JSON object must return, by the standard library's json
    (None: not an acceptable object)."""
    if len(raw) > MAX_OUTPUT_CHARS or not storable(raw):
        return None
    try:
        value = json.loads(raw, parse_constant=lambda name: 1 / 0)  # NaN, Infinity: refused
    except (ValueError, RecursionError, ZeroDivisionError):
        return None
    if not isinstance(value, dict) or depth(value) > MAX_JSON_DEPTH or not storable(value):
        return None
    return value


def depth(value: Any) -> int:
    """How deep lists and objects nest in a parsed value (iterative: it may be 10k deep)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level + 1)
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, level + 1) for child in children)
    return deepest


def storable(value: Any) -> bool:
    """Whether it encodes as UTF-8 (no lone surrogates anywhere)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- the Solver and the user simulator --------------------------------------------------------

ROLLOUT = RolloutSettings()


@pytest.fixture(scope="module")
def solver(retail: Environment) -> Solver:
    return Solver(Scripted(""), retail.policy, retail.tool_schemas, ROLLOUT)


def call(name: str, arguments: str) -> Completion:
    return Completion(tool_calls=[RawToolCall(id="c1", name=name, arguments=arguments)])


TOOLS = st.sampled_from(["get_order_details", "cancel_pending_order", RESPOND])


@FAST
@given(name=TOOLS | st.text(ANY_CHAR, max_size=30), arguments=BAD_ARGUMENTS | TEXT)
@example(name="get_order_details", arguments=DEEP_OBJECT).via("the RecursionError of issue 19")
@example(name="x" * 1_000_000, arguments="{}").via("a 1 MB tool name")
def test_a_tool_call_is_a_turn_or_a_reason(solver: Solver, name: str, arguments: str) -> None:
    message, problem = solver.interpret(call(name, arguments))
    message.model_dump_json()  # storable, whatever it holds
    assert len(message.content or "") <= MAX_OUTPUT_CHARS
    expected = reference_object(arguments) if name in solver.tool_names else None
    if name == RESPOND and expected is not None and not isinstance(expected.get("content"), str):
        expected = None
    assert (problem is None) == (expected is not None), (name[:40], arguments[:200], problem)
    if problem is None:
        assert not message.error
        assert (
            message.content == expected["content"]
            if name == RESPOND
            else (message.tool_calls[0].arguments == expected)
        )
    else:
        assert message.error
        assert len(problem) <= REASON_CHARS


@FAST
@given(text=TEXT, finish=st.sampled_from(["stop", "length", None]))
@example(text=HUGE, finish="stop").via("1 MB of plain text")
def test_plain_text_is_a_message_or_a_reason(solver: Solver, text: str, finish: str) -> None:
    message, problem = solver.interpret(Completion(content=text, finish_reason=finish))
    message.model_dump_json()
    assert len(message.content or "") <= MAX_OUTPUT_CHARS
    if len(text) > MAX_OUTPUT_CHARS or finish == "length" or not text.strip():
        assert problem is not None
        assert message.error


@FAST
@given(text=TEXT)
def test_a_user_reply_is_a_message_or_a_reason(text: str) -> None:
    completion = Completion(content=text, finish_reason="stop")
    if len(text) > MAX_OUTPUT_CHARS or not storable(text):
        with pytest.raises(MalformedOutput, match="user reply") as caught:
            parse_reply(completion)
        assert len(str(caught.value)) <= REASON_CHARS
        return
    reply = parse_reply(completion)
    assert reply.role == "user"
    assert reply.content == text.strip()
    reply.model_dump_json()


def test_a_huge_or_unstorable_user_reply_is_rejected() -> None:
    for text in (HUGE, "\ud800 hello"):
        with pytest.raises(MalformedOutput, match="user reply"):
            parse_reply(Completion(content=text))


# --- the agents that ask for JSON -------------------------------------------------------------


class Scripted:
    """An endpoint that always answers the same text (error handling only)."""

    model = "scripted"

    def __init__(self, text: str) -> None:
        self.text = text
        self.calls = 0

    async def complete(self, *_: Any, **__: Any) -> Completion:
        self.calls += 1
        return Completion(content=self.text, finish_reason="stop")


def draft_or_text(model: type[BaseModel]) -> st.SearchStrategy[tuple[str, bool]]:
    """(text, whether it is a valid draft): hostile text, a corrupted draft, or a valid one."""
    return st.one_of(
        TEXT.map(lambda t: (t, rejected(t, model) is None)),
        corrupted(model).map(lambda tf: (tf[0], False)),
        st.just((json.dumps(VALID[model]), True)),
    )


@FAST
@given(case=draft_or_text(DiagnosisDraft))
async def test_the_controller_falls_back_to_the_signals_on_any_bad_answer(
    retail: Environment, bus: Bus, case: tuple[str, bool]
) -> None:
    text, valid = case
    task, trajectory = factories.task(), factories.trajectory(reward=0.0)
    prefix = bus.settings.prefix
    controller = Controller(
        retail, TaskPool(bus.redis, prefix, []), PatternLibrary(bus.redis, prefix), bus,
        ControllerSettings(), Scripted(text),
    )  # fmt: skip
    diagnosis = await controller.diagnose(task, trajectory)
    assert (diagnosis.diagnoser_model == "scripted") == valid
    assert diagnosis.category in {s.category for s in diagnosis.signals}
    assert set(diagnosis.tools) <= retail.tool_names
    diagnosis.model_dump_json()


@FAST
@given(case=draft_or_text(ReflectionDraft))
async def test_the_reflector_falls_back_to_the_feedback_on_any_bad_answer(
    retail: Environment, case: tuple[str, bool]
) -> None:
    text, valid = case
    task, trajectory = factories.task(), factories.trajectory(reward=0.0)
    reflection = await Reflector(retail, LeafeSettings(), Scripted(text)).reflect(task, trajectory)
    signals = failure_signals(task, trajectory, retail)
    assert reflection.backtrack_step in allowed_steps(
        decision_points(trajectory), first_wrong_step(signals)
    )
    assert (reflection.source == "llm") == valid


@FAST
@given(case=draft_or_text(Speaker))
async def test_the_fidelity_judge_leaves_the_rules_verdict_on_any_bad_answer(
    case: tuple[str, bool],
) -> None:
    text, valid = case
    verdict = await ask_judge(Scripted(text), [], "Yes, please go ahead.")
    assert (verdict == "customer") if valid else verdict is None


PATTERN = ErrorPattern(
    id="pattern-hostile", title="wrong arguments in cancel_pending_order",
    description="The agent cancels the wrong order.", category=FailureCategory.WRONG_ARGUMENTS,
    tools=["cancel_pending_order"], frequency={0: 1},
)  # fmt: skip


@FAST
@given(case=draft_or_text(TaskDraft))
@example(case=(json.dumps({**VALID[TaskDraft], "writes": [{"name": 5, "arguments": []}]}), False))
async def test_the_proposer_turns_any_bad_draft_into_a_schema_verdict(
    retail: Environment, bus: Bus, case: tuple[str, bool]
) -> None:
    text, valid = case
    book = PromptBook(bus.redis, bus.settings.prefix, ProposerSettings())
    proposer = Proposer(retail, book, bus, ProposerSettings(seed=1), Scripted(text))
    stream = bus.keys.stream(Stream.VALIDATIONS)
    before = await bus.redis.xlen(stream)
    proposal = await proposer.write(PATTERN)
    verdicts = await bus.redis.xrevrange(stream, count=1)
    if valid:
        assert isinstance(proposal, TaskProposal)
        assert await bus.redis.xlen(stream) == before
        return
    assert proposal is None
    assert await bus.redis.xlen(stream) == before + 1  # the prompt book learns from it
    verdict = Envelope.from_wire(verdicts[0][1], ValidationResult).payload
    assert not verdict.accepted
    [reason] = verdict.reasons
    assert reason.code == RejectionCode.SCHEMA
    assert reason.detail.startswith(("TaskDraft: ", "Task: ")), reason.detail


@FAST
@given(name=TOOLS, arguments=OBJECTS, cut=st.integers(min_value=1), data=st.data())
def test_a_call_cut_at_max_tokens_is_kept_only_when_its_json_closed(
    solver: Solver, name: str, arguments: dict[str, Any], cut: int, data: st.DataObject
) -> None:
    """Cut inside or before `</tool_call>`: the call the JSON names. Cut inside the JSON:
    malformed, never a guess."""
    body = json.dumps({"name": name, "arguments": arguments})
    text = f"<tool_call>\n{body}\n</tool_call>"
    end = len(text) - 1 - (cut % (len(text) - 1))  # anywhere before the last character
    message, problem = solver.interpret(Completion(content=text[:end], finish_reason="length"))
    closed = end >= text.index(body) + len(body)
    valid = name != RESPOND or isinstance(arguments.get("content"), str)
    assert (problem is None) == (closed and valid), (text[:end][-60:], problem)
    if problem is None and name != RESPOND:
        assert message.tool_calls[0].arguments == arguments
    stopped = Completion(content=text[:end], finish_reason="stop")  # not cut: not salvaged
    assert solver.interpret(stopped)[0].tool_calls == []
