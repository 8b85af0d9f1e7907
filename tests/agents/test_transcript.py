"""Token-in/token-out against the real server: the growing sequence is the served template's
rendering of the conversation (junctions included), and the trainer's logprob of every
sampled token equals vLLM's, on every turn; thinking turns too. Plus the parser and the
sequence's bookkeeping without a server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sentinel.agents.llm import DISALLOWED_LOGPROB, Generation, OpenAIChatClient, forced
from sentinel.agents.parsing import parse_completion, split_reasoning
from sentinel.agents.solver import Solver
from sentinel.agents.transcript import Template, Transcript, guided_schema, sample_turn
from sentinel.config import RolloutSettings, ServeSettings
from sentinel.envs.base import Environment
from sentinel.schemas import ChatMessage
from sentinel.schemas.trajectory import SampledSpan, Segment, Trajectory
from sentinel.training.batch import Sample, guided_spans, learnable, pack
from sentinel.training.grammar import GrammarReplay, mask_logits, stop_tokens
from sentinel.training.grpo import collate, policy_logprobs
from tests import factories

SETTINGS = RolloutSettings(max_tokens=40, temperature=1.2)
COMPACT = ServeSettings().compact_json  # as the tests' server compiles JSON grammars
OPENING = [
    ChatMessage(role="assistant", content="Hi! How can I help you today?"),
    ChatMessage(role="user", content="Please mark task_1 as completed, it is done."),
]
# SmolLM2 made to think: a reasoning block, then a guided `respond` call.
THINKING = (
    r'<think>[a-z ]{1,40}</think>\n\[\{"name": "respond", "parameters": '
    r'\{"content": "[A-Za-z ,.!]{1,40}"\}\}\]'
)
# float32 on both sides (vLLM-CPU serves float32): differences are summation order only.
FLOAT32_NOISE = 2e-3


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Iterator[torch.nn.Module]:
    return AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()


def reply_to(message: ChatMessage, turn: int) -> list[ChatMessage]:
    """What follows an agent turn: a tool result after a call (or on even turns, so the free
    format crosses tool junctions too), else the user's answer."""
    if message.tool_calls or turn % 2 == 0:
        call = message.tool_calls[0].id if message.tool_calls else f"call-{turn}"
        return [ChatMessage(role="tool", tool_call_id=call, content=f'{{"done": {turn}}}')]
    return [ChatMessage(role="user", content=f"Thanks. Also task_{turn + 2}, please.")]


async def converse(
    solver: Solver,
    transcript: Transcript,
    turns: int,
    *,
    guided: bool = True,
    regex: str | None = None,
) -> tuple[list[ChatMessage], list[str]]:
    """`turns` agent turns on the token path, with scripted replies; the history and the
    sampled texts. `guided`: under the grammar of tool_choice=required, else free."""
    history, texts = list(OPENING), []
    schema = guided_schema(solver.tools) if guided and regex is None else None
    for turn in range(turns):
        sampled = await sample_turn(
            solver, transcript, history, max_tokens=SETTINGS.max_tokens,
            json_schema=schema, regex=regex,
        )  # fmt: skip
        texts.append(sampled.message.content or "")
        history.append(sampled.message)
        history += reply_to(sampled.message, turn)
    return history, texts


async def detokenize(client: OpenAIChatClient, ids: list[int]) -> str:
    root = client.endpoint.base_url.removesuffix("/v1")
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            f"{root}/detokenize", json={"model": client.model, "tokens": ids},
            headers=client.endpoint.auth_headers(),
        )  # fmt: skip
    response.raise_for_status()
    return str(response.json()["prompt"])


async def canonical(
    client: OpenAIChatClient, solver: Solver, history: list[ChatMessage], transcript: Transcript
) -> str:
    """The template's own rendering of the whole conversation, each sampled turn as the text
    it decodes to: what the growing sequence must spell."""
    rendered = solver.render(history)
    segment = transcript.segments[0]
    index = {s.message_index: s for s in segment.turns}
    assistants = [i for i, m in enumerate(history) if m.role == "assistant"][1:]  # not the greeting
    positions = [i for i, m in enumerate(rendered) if m["role"] == "assistant"][1:]
    for message_index, position in zip(assistants, positions, strict=True):
        span = index[message_index]
        text = await detokenize(client, segment.token_ids[span.start : span.end])
        rendered[position] = {"role": "assistant", "content": text.removesuffix("<|im_end|>")}
    ids = await client.tokenize(rendered, tools=solver.tools)
    return await detokenize(client, ids)


def scored(
    model: torch.nn.Module, trajectory: Trajectory, replay: GrammarReplay | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's logprob of every sampled (unforced) token of the trajectory's one row,
    and vLLM's; with a `replay`, under each guided turn's grammar, as the trainer scores."""
    [(ids, mask, behaviour, temperature)] = pack(trajectory)
    [guided] = guided_spans(trajectory, 1)
    sample = Sample(ids, mask, behaviour, 0.0, 0.0, trajectory.id, "", temperature, guided)
    tensors = collate([sample], pad_id=0, device=torch.device("cpu"), replay=replay)
    with torch.no_grad():
        logp = policy_logprobs(model, tensors)[tensors.loss_mask]
    return logp, tensors.behaviour[tensors.loss_mask]


@pytest.mark.anyio
async def test_a_multi_turn_rollout_grows_one_sequence_the_trainer_scores_as_vllm_did(
    mock: Environment, llm: Callable[..., OpenAIChatClient], model: torch.nn.Module
) -> None:
    """Free sampling (the tau2 format's: no grammar), 3 turns across tool and user junctions."""
    client = llm()
    solver = Solver(client, mock.policy, mock.tool_schemas, SETTINGS)
    transcript = Transcript(
        client, await Template.learn(client), solver.tools, 1.2, compact_json=COMPACT
    )
    history, _ = await converse(solver, transcript, turns=3, guided=False)
    prompt = await transcript.prompt(solver.render(history))  # the 4th turn's prompt

    [segment] = transcript.segments  # the sequence only grew: one row
    assert len(segment.turns) == 3
    assert await detokenize(client, prompt) == await canonical(client, solver, history, transcript)
    trajectory = factories.trajectory(0)
    trajectory.tokens = transcript.segments
    trainer, vllm = scored(model, trajectory)
    assert len(trainer) > 10
    assert float((trainer - vllm).abs().max()) < FLOAT32_NOISE


@pytest.mark.anyio
async def test_guided_turns_grow_one_sequence_whose_logprobs_only_the_grammar_raises(
    mock: Environment, llm: Callable[..., OpenAIChatClient], model: torch.nn.Module
) -> None:
    """Under guided decoding vLLM reports logprobs after the grammar's mask: a sampled token's
    is its unmasked logprob (the trainer's) plus the log of the mass the mask removed, so
    never below the trainer's. The sequence itself is the template's, junctions included."""
    client = llm()
    solver = Solver(client, mock.policy, mock.tool_schemas, SETTINGS)
    transcript = Transcript(
        client, await Template.learn(client), solver.tools, 1.2, compact_json=COMPACT
    )
    history, _ = await converse(solver, transcript, turns=3)
    prompt = await transcript.prompt(solver.render(history))
    assert len(transcript.segments) == 1
    assert await detokenize(client, prompt) == await canonical(client, solver, history, transcript)
    trajectory = factories.trajectory(0)
    trajectory.tokens = transcript.segments
    trainer, vllm = scored(model, trajectory)
    assert bool((trainer <= vllm + FLOAT32_NOISE).all())


@pytest.mark.anyio
@pytest.mark.parametrize("regex", [None, THINKING], ids=["tool-schema", "thinking-regex"])
async def test_with_the_grammar_replayed_the_trainer_scores_every_guided_token_as_vllm_did(
    mock: Environment,
    llm: Callable[..., OpenAIChatClient],
    model: torch.nn.Module,
    model_dir: Path,
    regex: str | None,
) -> None:
    """The trainer masks its logits with each turn's grammar (xgrammar, as vLLM compiles
    it): then every sampled token's logprob, forced or free, equals vLLM's, directly and
    through the trainer's own scoring. Fails if the grammar is not replayed (the masked mass
    makes vLLM's higher)."""
    client = llm()
    solver = Solver(client, mock.policy, mock.tool_schemas, SETTINGS)
    transcript = Transcript(
        client, await Template.learn(client), solver.tools, 1.2, compact_json=COMPACT
    )
    await converse(solver, transcript, turns=2, regex=regex)
    [segment] = transcript.segments
    assert len(segment.grammars) == 1
    assert all(span.grammar == 0 for span in segment.turns)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    replay = GrammarReplay(tokenizer, model.config.vocab_size, stop_tokens(model, tokenizer))
    ids = torch.tensor([segment.token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / segment.temperature
    unmasked_gap = 0.0
    for span in segment.turns:
        sampled = segment.token_ids[span.start : span.end]
        masks = replay.bitmasks(segment.grammars[0], sampled)
        assert masks is not None, "the grammar refused a token the server sampled under it"
        rows = logits[span.start - 1 : span.end - 1]  # logits at t score the token at t + 1
        target = torch.tensor(sampled)[:, None]
        ours = torch.log_softmax(mask_logits(rows, masks), -1).gather(1, target)[:, 0]
        vllm = torch.tensor(span.logprobs)
        assert float((ours - vllm).abs().max()) < FLOAT32_NOISE
        free = torch.log_softmax(rows, -1).gather(1, target)[:, 0]
        unmasked_gap = max(unmasked_gap, float((vllm - free).max()))
    assert unmasked_gap > FLOAT32_NOISE  # without the replay, they would not match
    trajectory = factories.trajectory(0)
    trajectory.tokens = transcript.segments
    trainer, vllm = scored(model, trajectory, replay)
    assert float((trainer - vllm).abs().max()) < FLOAT32_NOISE


@pytest.mark.anyio
async def test_without_the_junction_the_sequence_is_not_the_template_rendering(
    mock: Environment, llm: Callable[..., OpenAIChatClient]
) -> None:
    client = llm()
    solver = Solver(client, mock.policy, mock.tool_schemas, SETTINGS)
    template = await Template.learn(client)
    assert template.closing == [2, 198]  # ChatML: <|im_end|> "\n"
    assert template.junction([5, 2]) == [198]  # stopped on <|im_end|>: the newline is left
    assert template.junction([5, 6]) == [2, 198]  # cut off: both
    broken = Template(prefix=template.prefix, closing=[])  # junction handling removed
    transcript = Transcript(
        client, broken, solver.tools, SETTINGS.temperature, compact_json=COMPACT
    )
    history, _ = await converse(solver, transcript, turns=2)
    prompt = await transcript.prompt(solver.render(history))
    assert await detokenize(client, prompt) != await canonical(client, solver, history, transcript)


@pytest.mark.anyio
async def test_new_messages_render_without_the_templates_default_system_prompt(
    llm: Callable[..., OpenAIChatClient],
) -> None:
    client = llm()
    template = await Template.learn(client)
    alone = await client.tokenize([{"role": "user", "content": "hi"}])
    grown = await template.render_new(client, [{"role": "user", "content": "hi"}])
    assert "SmolLM" in await detokenize(client, alone)  # the trap: a default system prompt
    assert grown is not None
    assert (
        await detokenize(client, grown) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.anyio
async def test_thinking_turns_are_sampled_kept_in_the_sequence_and_trained(
    mock: Environment, llm: Callable[..., OpenAIChatClient], model: torch.nn.Module
) -> None:
    client = llm()
    solver = Solver(client, mock.policy, mock.tool_schemas, SETTINGS)
    transcript = Transcript(
        client, await Template.learn(client), solver.tools, 1.0, compact_json=COMPACT
    )
    history, _ = await converse(solver, transcript, turns=3, regex=THINKING)
    assert all(m.content and "<think>" not in m.content for m in history[2::2])  # parsed out
    [segment] = transcript.segments
    text = await detokenize(client, segment.token_ids)
    assert text.count("<think>") == 3  # earlier turns' reasoning stays in the sequence
    trajectory = factories.trajectory(0)
    trajectory.tokens = transcript.segments
    [(ids, mask, _, _)] = pack(trajectory)
    trained = await detokenize(client, [i for i, m in zip(ids, mask, strict=True) if m][:2])
    assert trained.replace(" ", "").isalpha()  # [a-z ]: reasoning tokens carry loss
    for span in segment.turns:  # the grammar's verdict, not a logprob threshold
        assert span.forced is not None
        assert mask[span.start : span.end] == learnable(span.logprobs, span.forced)
        assert span.forced[0] == 0, "the turn's opening '<' is the only token allowed"
    trainer, vllm = scored(model, trajectory)  # under the regex's grammar, as guided turns
    assert bool((trainer <= vllm + FLOAT32_NOISE).all())


def test_the_guided_schema_is_the_one_vllm_builds_for_required() -> None:
    utils = pytest.importorskip("vllm.tool_parsers.utils")
    protocol = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
    tools = [factories_tool("a", {"type": "object", "properties": {"x": {"type": "string"}}}),
             factories_tool("b", None)]  # fmt: skip
    theirs = utils.get_json_schema_from_tools(
        "required", [protocol.ChatCompletionToolsParam(**t) for t in tools], False
    )
    assert guided_schema(tools) == theirs


def factories_tool(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "description": name}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


@pytest.mark.parametrize(
    ("text", "reasoning", "content", "calls"),
    [
        ('[{"name": "r", "parameters": {"content": "hi"}}]', None, None,
         [("r", {"content": "hi"})]),
        ('<think>plan</think>\n[{"name": "f", "parameters": {}}]', "plan", None, [("f", {})]),
        ("plan first</think>Hello", "plan first", "Hello", []),
        ("<think>never closed", "never closed", "", []),
        ('Sure.<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', None, "Sure.",
         [("f", {"a": 1})]),
        ("<tool_call>{not json}</tool_call>", None, "<tool_call>{not json}</tool_call>", []),
        ('[{"name": 3}]', None, '[{"name": 3}]', []),
        ("[" * 5000 + "]" * 5000, None, "[" * 5000 + "]" * 5000, []),
        ("just text", None, "just text", []),
        ('<tool_call>{"name": "f"}</tool_call><tool_call>{"name": "g"}</tool_call>', None, None,
         [("f", {}), ("g", {})]),
    ],
)  # fmt: skip
def test_one_parser_reads_reasoning_calls_and_text(
    text: str, reasoning: str | None, content: str | None, calls: list[tuple[str, Any]]
) -> None:
    completion = parse_completion(text, "stop", "call-3")
    assert completion.reasoning == reasoning
    assert completion.content == content
    assert [(c.name, json.loads(c.arguments)) for c in completion.tool_calls] == calls
    assert all(c.id.startswith("call-3-") for c in completion.tool_calls)


def test_split_reasoning_leaves_plain_text_alone() -> None:
    text = "a <think>b</think> c"  # not at the start: text that mentions the tags
    assert split_reasoning(text) == (None, text)


def test_a_segment_refuses_spans_that_overlap_or_fall_outside() -> None:
    with pytest.raises(ValueError, match="outside"):
        Segment(token_ids=[1, 2], turns=[SampledSpan(message_index=2, start=1, logprobs=[-1, -1])])
    with pytest.raises(ValueError, match="overlaps"):
        Segment(
            token_ids=[1, 2, 3, 4],
            turns=[SampledSpan(message_index=2, start=0, logprobs=[-1, -1]),
                   SampledSpan(message_index=4, start=1, logprobs=[-1])],
        )  # fmt: skip


def test_one_rollout_is_one_row_with_loss_on_its_sampled_unforced_tokens() -> None:
    trajectory = factories.trajectory(0)
    trajectory.tokens = [
        Segment(
            token_ids=list(range(10)),
            turns=[SampledSpan(message_index=2, start=2, logprobs=[-1.0, 0.0, -2.0]),
                   SampledSpan(message_index=4, start=7, logprobs=[-0.5, -3.0])],
            temperature=0.7,
        )
    ]  # fmt: skip
    [(ids, mask, behaviour, temperature)] = pack(trajectory)
    assert ids == list(range(10))
    assert temperature == 0.7
    assert mask == [False, False, True, False, True, False, False, True, True, False]
    assert behaviour[2:5] == [-1.0, 0.0, -2.0]
    assert behaviour[7:9] == [-0.5, -3.0]
    trajectory.tokens.append(Segment(token_ids=[1, 2, 3], turns=[]))
    assert len(pack(trajectory)) == 2
    assert trajectory.splits == 1


def test_the_grammars_forced_tokens_and_only_they_carry_no_loss() -> None:
    """A near-certain free choice (-1e-6) keeps its loss when the grammar's verdict is known;
    a record from before it was kept falls back to the logprob threshold."""
    logprobs = [0.0, -1e-6, 0.0, -2.0]
    known = SampledSpan(message_index=2, start=0, logprobs=logprobs, forced=[0, 2])
    old = SampledSpan(message_index=2, start=0, logprobs=logprobs)
    trajectory = factories.trajectory(0)
    for span, expected in ((known, [False, True, False, True]), (old, [False, False, False, True])):
        trajectory.tokens = [Segment(token_ids=[5, 6, 7, 8], turns=[span])]
        [(_, mask, _, _)] = pack(trajectory)
        assert mask == expected
    with pytest.raises(ValueError, match="not increasing"):
        SampledSpan(message_index=2, start=0, logprobs=[0.0, 0.0], forced=[1, 1])
    with pytest.raises(ValueError, match="not increasing"):
        SampledSpan(message_index=2, start=0, logprobs=[0.0], forced=[1])


def test_forced_means_logprob_zero_with_every_listed_rival_masked() -> None:
    masked = DISALLOWED_LOGPROB
    rivals = [[masked], [-12.2], [], [masked, -3.0], [masked]]
    assert forced([0.0, 0.0, 0.0, 0.0, -1e-7], rivals) == [0, 2]
    assert forced([0.0, -1.0], [[], []]) is None  # no candidates listed: not known


@pytest.mark.anyio
async def test_vllm_marks_the_tokens_its_grammar_forced(
    llm: Callable[..., OpenAIChatClient],
) -> None:
    """Against the real server: under a regex, the first "<" (no other token starts
    "<think>") and the end of text after "yes" are forced; a free [a-z] token never is."""
    client = llm()
    prompt = await client.tokenize([{"role": "user", "content": "Think, then say yes."}])
    generation = await client.generate(
        prompt, max_tokens=24, temperature=1.0, regex="<think>[a-z]{1,6}</think>yes"
    )
    assert generation.forced is not None
    assert generation.forced[0] == 0
    assert generation.forced[-1] == len(generation.token_ids) - 1
    texts = [await detokenize(client, [i]) for i in generation.token_ids]
    inside = "".join(texts).index("</think>")
    position = 0
    for index, text in enumerate(texts):
        if len("<think>") <= position < inside and text.isalpha():  # the free reasoning
            assert index not in generation.forced, (texts, generation.forced)
        position += len(text)
    assert all(generation.logprobs[i] == 0.0 for i in generation.forced)


def test_a_trajectory_without_tokens_from_before_still_reads() -> None:
    old = factories.trajectory(0).model_dump(mode="json")
    old.pop("tokens")
    assert Trajectory.model_validate(old).tokens == []


class Recorded:
    """Fixed renders and generations: the transcript's bookkeeping without a server."""

    model = "recorded"

    def __init__(self) -> None:
        self.full = 0

    async def tokenize(
        self, messages: Any, *, tools: Any = None, generation_prompt: bool = True
    ) -> list[int]:
        if messages[1]["content"] == "." and len(messages) > 3:  # a dummy prefix + new ones
            return [9, 9, 9, 2, 198, *[50 + len(m["content"]) for m in messages[3:]], 7]
        self.full += 1
        return [1, *[50 + len(m["content"]) for m in messages], 7]

    async def generate(self, prompt_ids: list[int], **_: Any) -> Generation:
        return Generation(text="x", token_ids=[30, 31, 2], logprobs=[-1.0, -2.0, 0.0])


@pytest.mark.anyio
async def test_the_sequence_grows_and_a_new_system_prompt_splits_it() -> None:
    client = Recorded()
    template = Template(prefix=[9, 9, 9, 2, 198], closing=[2, 198])
    transcript = Transcript(client, template, None, 1.0, compact_json=COMPACT)
    system = {"role": "system", "content": "s"}
    first = await transcript.prompt([system, {"role": "user", "content": "hi"}])
    transcript.record(await client.generate(first), 1)
    grown = await transcript.prompt(
        [system, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"},
         {"role": "tool", "content": "r"}]
    )  # fmt: skip
    assert grown == [*first, 30, 31, 2, 198, 51, 7]
    assert client.full == 1
    transcript.record(await client.generate(grown), 3)
    await transcript.prompt(
        [{"role": "system", "content": "other"}, {"role": "user", "content": "hi"}]
    )
    assert transcript.splits == 1
    assert client.full == 2
