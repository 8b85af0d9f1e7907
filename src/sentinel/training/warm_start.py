"""Agent SFT before RL (EigenData's warm start): tool-grounded dialogues, TRL's SFTTrainer,
and a published policy version that RL starts from.

Dialogues. Each train task (and accepted proposed task) becomes one conversation in rollout
order: the user's turns are the scripted ones the user model learns from
(`usersim.dialogues.script`: the request, the withheld fact, the identity, a "yes" to each
write, the goodbye with ###STOP###); the agent's are the task's gold actions, executed in a
fresh episode so every tool result is the environment's own output, with the reads before
the confirmation of the write they lead to. A dialogue whose replay does not earn reward 1
(what a scripted user cannot do: a user's own tools) is dropped and counted, so only verified
conversations teach. Test-split tasks are refused.

Rendering. The Solver renders each dialogue exactly as it prompts the server
(`Solver.render`: its system prompt, its tools, its action format, so `guided` turns become
`respond` calls), and the served chat template turns it into text.

Training. TRL's `SFTTrainer` with `assistant_only_loss`: loss on every assistant turn from
after its header (the generation prompt) through its end-of-turn token, as `training.sft`
masks. TRL finds the turns by `{% generation %}` markers, which the served template has
none of, so `training_template` adds them; every rendered dialogue is checked to render to
the same text with both templates, so the model learns what it will be prompted with.

Publishing. The trained adapter is policy version 1, published through the trainer's
`LoRAPublisher` (so vLLM serves it as `policy-v1`) and saved as the trainer's checkpoint,
so the trainer resumes RL from it and its next version is 2.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel

from sentinel.agents.llm import Completion, Messages
from sentinel.agents.solver import Solver
from sentinel.config import RolloutSettings, Settings
from sentinel.logs import get_logger
from sentinel.schemas import Action, ChatMessage, PolicyVersion, Task, TerminationReason, ToolCall
from sentinel.usersim.dialogues import script

if TYPE_CHECKING:
    from sentinel.envs.base import Environment, Episode
    from sentinel.training.policy import Policy
    from sentinel.training.publisher import WeightPublisher

log = get_logger(__name__)

Row = dict[str, Any]  # {"task_id", "messages", "tools" (JSON text)}: one SFT dialogue


class WarmStartError(RuntimeError):
    """The warm start cannot run: nothing verified to train on, or RL already started."""


@dataclass
class Grounded:
    """A synthesised dialogue in rollout order, and the reward its episode earned."""

    task: Task
    messages: list[ChatMessage]
    reward: float


class WarmStartResult(BaseModel):
    dialogues: int
    dropped: list[str]  # tasks whose scripted dialogue did not earn reward 1
    loss_before: float
    loss_after: float
    steps: int
    version: PolicyVersion | None = None


# -- dialogues ------------------------------------------------------------------------------


def refuse_test_split(domain: Environment, tasks: Sequence[Task]) -> None:
    """Held-out tasks never train the Solver: by their split or by a test task's id."""
    test_ids = {t.id for t in domain.tasks("test")}
    leaked = [t.id for t in tasks if t.provenance.split == "test" or t.id in test_ids]
    if leaked:
        raise ValueError(f"test-split tasks cannot train the Solver: {', '.join(leaked)}")


def converse(domain: Environment, task: Task) -> Grounded:
    """The task's scripted user turns around its gold actions, run in a fresh episode."""
    dialogue = script(task, domain.write_tools)
    scripted, confirm = dialogue.messages, dialogue.stages["confirm"]
    confirms = [scripted[i : i + 2] for i in range(confirm, len(scripted) - 2, 2)]
    episode = domain.episode(task)
    messages = list(scripted[:confirm])  # greeting, request, withheld fact, identity
    reads: list[Action] = []
    writes = 0
    for action in task.agent_actions:
        if action.name not in domain.write_tools:
            reads.append(action)
            continue
        messages += _run(episode, reads, len(messages)) + confirms[writes]
        messages += _run(episode, [action], len(messages))
        reads, writes = [], writes + 1
    if writes == 0:  # the script's one generic confirmation
        messages += confirms[0]
    messages += _run(episode, reads, len(messages)) + scripted[-2:]  # the close, the goodbye
    reward = domain.reward(task, episode, messages, TerminationReason.USER_STOP).reward
    return Grounded(task=task, messages=messages, reward=reward)


def _run(episode: Episode, actions: Sequence[Action], start: int) -> list[ChatMessage]:
    """Each action as the agent's one tool call and the environment's real answer."""
    out: list[ChatMessage] = []
    for action in actions:
        call = ToolCall(id=f"call-{start + len(out)}", name=action.name, arguments=action.arguments)
        result = episode.step(call)
        out.append(ChatMessage(role="assistant", tool_calls=[call]))
        out.append(
            ChatMessage(
                role="tool", tool_call_id=call.id, content=result.content, error=result.error
            )
        )
    return out


def synthesise(
    domain: Environment, tasks: Sequence[Task], advance: Callable[[], None] = lambda: None
) -> tuple[list[Grounded], list[str]]:
    """Verified dialogues (reward 1), and the ids of the tasks whose dialogue was not."""
    refuse_test_split(domain, tasks)
    kept: list[Grounded] = []
    dropped: list[str] = []
    for task in tasks:
        grounded = converse(domain, task)
        (kept.append(grounded) if grounded.reward >= 1.0 else dropped.append(task.id))
        advance()
    log.info("dialogues synthesised", kept=len(kept), dropped=len(dropped))
    return kept, dropped


class _Offline:
    """A client that is never called: `Solver.render` needs no endpoint."""

    model = "offline"

    async def complete(self, messages: Messages, **options: Any) -> Completion:
        raise RuntimeError("rendering only")


def solver_for(domain: Environment, rollout: RolloutSettings) -> Solver:
    return Solver(_Offline(), domain.policy, domain.tool_schemas, rollout)


def render(solver: Solver, grounded: Grounded) -> Row:
    """The dialogue as the Solver prompts the server, through its last assistant turn."""
    messages = solver.render(grounded.messages)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {
        "task_id": grounded.task.id,
        "messages": messages[: last + 1],
        "tools": json.dumps(solver.tools),
    }


# -- the training template ------------------------------------------------------------------

_ASSISTANT = re.compile(
    r"\{%- if message\['role'\] == 'assistant' -%\}.*?(?=\{%- elif message\['role'\] == 'tool')",
    re.S,
)
# The served ChatML assistant block with `{% generation %}` around what the model samples:
# its content or calls (not the newline the generation prompt already ends with) and its
# <|im_end|> (not the newline after it). It renders the very same text.
_MARKED = (
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant' -}}"
    "{%- set said = namespace(any=false) -%}"
    "{%- if message['content'] -%}{{- '\\n' -}}"
    "{% generation %}{{- message['content'] -}}{% endgeneration %}"
    "{%- set said.any = true -%}{%- endif -%}"
    "{%- if message.tool_calls is defined and message.tool_calls -%}"
    "{%- for tc in message.tool_calls -%}"
    "{%- set f = tc.function if tc.function is defined else tc -%}"
    "{%- set args = f.arguments -%}"
    "{%- if said.any -%}{% generation %}{{- '\\n' -}}{% endgeneration %}"
    "{%- else -%}{{- '\\n' -}}{%- set said.any = true -%}{%- endif -%}"
    '{% generation %}{{- \'<tool_call>\\n{"name": "\' + f.name + \'", "arguments": \' -}}'
    "{%- if args is string -%}{{- args -}}{%- else -%}{{- args | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}{% endgeneration %}"
    "{%- endfor -%}{%- endif -%}"
    "{% generation %}{{- '<|im_end|>' -}}{% endgeneration %}{{- '\\n' -}}"
)


def training_template(served: str) -> str:
    """The served template with generation markers on the assistant's turns."""
    marked, found = _ASSISTANT.subn(lambda _: _MARKED, served)
    if found != 1:
        raise WarmStartError("the served chat template's assistant block is not ChatML's")
    return marked


def check_renders(tokenizer: Any, rows: Sequence[Row], served: str, training: str) -> None:
    """Every dialogue renders to the same text with both templates (else the model would
    learn text it is never prompted with)."""
    for row in rows:
        texts = [
            tokenizer.apply_chat_template(
                row["messages"], tools=json.loads(row["tools"]), chat_template=template,
                tokenize=False,
            )
            for template in (served, training)
        ]  # fmt: skip
        if texts[0] != texts[1]:
            raise WarmStartError(f"{row['task_id']}: the training template renders other text")


def assistant_masks(tokenizer: Any, row: Row, template: str) -> tuple[list[int], list[int]]:
    """Token ids and the assistant-only mask, as TRL's SFTTrainer computes them."""
    out = tokenizer.apply_chat_template(
        row["messages"], tools=json.loads(row["tools"]), chat_template=template, tokenize=True,
        return_dict=True, return_assistant_tokens_mask=True,
    )  # fmt: skip
    return list(out["input_ids"]), list(out["assistant_masks"])


# -- fine-tuning and publishing -------------------------------------------------------------


@dataclass
class Fit:
    loss_before: float
    loss_after: float
    steps: int


def fine_tune(policy: Policy, rows: Sequence[Row], settings: Settings, output_dir: Path) -> Fit:
    """TRL's SFTTrainer on the policy's model (LoRA or full), assistant-only loss; the mean
    loss on the dialogues before and after."""
    from datasets import Dataset  # type: ignore[import-untyped]
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    tokenizer, served = policy.tokenizer, policy.chat_template
    training = training_template(served)
    check_renders(tokenizer, rows, served, training)
    dataset = Dataset.from_list([{"messages": r["messages"], "tools": r["tools"]} for r in rows])
    saved, tokenizer.chat_template = tokenizer.chat_template, training
    try:
        trainer = SFTTrainer(
            model=cast(Any, policy.model), args=_config(policy, settings, output_dir, SFTConfig),
            train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer,
        )  # fmt: skip
        before = trainer.evaluate()["eval_loss"]
        result = trainer.train()
        after = trainer.evaluate()["eval_loss"]
    finally:
        tokenizer.chat_template = saved
    log.info("warm start trained", loss_before=before, loss_after=after, steps=result.global_step)
    return Fit(loss_before=float(before), loss_after=float(after), steps=result.global_step)


def _config(policy: Policy, settings: Settings, output_dir: Path, config: Any) -> Any:
    sft, cpu = settings.sft, policy.device.type == "cpu"
    return config(
        output_dir=str(output_dir), assistant_only_loss=True, max_length=sft.max_length,
        num_train_epochs=sft.epochs, learning_rate=sft.learning_rate,
        # a dialogue at a time (long tau2 prompts), a step every `batch_size` of them
        per_device_train_batch_size=1, gradient_accumulation_steps=sft.batch_size,
        per_device_eval_batch_size=1,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=policy.settings.max_grad_norm, seed=policy.settings.seed,
        gradient_checkpointing=policy.settings.gradient_checkpointing,
        bf16=not cpu, use_cpu=cpu, logging_steps=1, save_strategy="no", report_to="none",
        dataloader_num_workers=0,
    )  # fmt: skip


async def publish(
    policy: Policy, publisher: WeightPublisher, checkpoints: Path, fit: Fit
) -> PolicyVersion:
    """The fine-tuned weights as policy version 1: served through the publisher, and the
    trainer's first checkpoint, so RL resumes from them."""
    import anyio

    policy.step, policy.version = 1, 1
    version = await publisher.publish(policy, policy.step)
    state: dict[str, object] = {"trained_groups": [], "last_reports": [], "warm_start": vars(fit)}
    await anyio.to_thread.run_sync(policy.checkpoint, checkpoints / "step-1", state)
    return version


def checkpoints_dir(settings: Settings) -> Path:
    """Where the trainer keeps (and resumes from) its checkpoints."""
    return settings.run_dir / "trainer" / "checkpoints"


def started(settings: Settings) -> bool:
    """Whether the run's trainer has a checkpoint: RL (or a warm start) already ran."""
    return any(checkpoints_dir(settings).glob("step-*[0-9]"))


def accepted_tasks(run_dir: Path) -> list[Task]:
    """The accepted proposed tasks in a run's record (its `tasks` stream)."""
    from sentinel.orchestrator.streams import Stream
    from sentinel.report import Artifacts

    return Artifacts(run_dir).read(Stream.TASKS, Task)
