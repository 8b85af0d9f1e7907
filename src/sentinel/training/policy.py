"""The trainable policy: a causal LM with a LoRA adapter (or full weights), its optimizer,
policy-gradient steps (the algorithm `trainer.algorithm` names), SFT steps, and checkpoints
that a restarted trainer resumes from.

A step trains on one batch of groups. With `trainer.updates_per_batch` = k > 1 the batch's
trajectories are split into k mini-batches (in order, so a group mostly stays together),
each re-weighed by the algorithm and trained once, one optimizer step each, against the
policy's logprobs before the first (recomputed once): the ratio departs from 1 and the clip
acts. The step still counts once (step, version, checkpoints, publishing, one report).

The same code runs on CPU in tests (float32) and on a GPU in the cluster (bfloat16); only
`trainer.device` and the model directory change.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from sentinel.config import TrainerSettings
from sentinel.logs import get_logger
from sentinel.schemas import RolloutGroup, SFTExample, TrainStepReport
from sentinel.training.algorithms import algorithm
from sentinel.training.batch import Sample, build_batch, micro_batches
from sentinel.training.distributed import (
    STOP,
    World,
    full_optimizer,
    full_weights,
    load_optimizer,
    load_weights,
    release,
    shard,
    share,
)
from sentinel.training.grammar import GrammarReplay, stop_tokens
from sentinel.training.grpo import (
    Loss,
    LossConfig,
    LossStats,
    Tensors,
    backward_sharing_prefix,
    collate,
    grpo_loss,
    policy_logprobs,
    reference,
    silenced,
)
from sentinel.training.sft import TemplateError, default_template, sft_loss, tokenize, weigh

log = get_logger(__name__)

STATE = "trainer_state.json"
COLLECTIVE = frozenset({"grpo_step", "sft_step", "save_adapter", "checkpoint", "restore"})
P = ParamSpec("P")
R = TypeVar("R")


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_ABOVE = 1 << 16


def map_large_allocations() -> bool:
    """Large CPU tensors from their own mmap, returned to the system when freed.

    glibc raises its mmap threshold after each large free, so a training step's activations
    end up on the fragmented heap: measured on a 5.5k-token tau2 group (SmolLM2-135M, CPU),
    peak RSS 7.0 GB and 138 s with the default, 3.4 GB and 100 s with a fixed threshold.
    Setting it also stops the adjustment. A no-op off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE))


def collective(method: Callable[Concatenate[Policy, P], R]) -> Callable[Concatenate[Policy, P], R]:
    """A call every trainer process makes together (sharded: FSDP's collectives): a leading
    rank 0 announces it, with its arguments, to the ranks waiting in `Policy.follow`."""

    def announced(policy: Policy, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if kwargs:
            raise TypeError(f"{method.__name__}: pass arguments by position (they are broadcast)")
        if policy.leading:
            policy.world.announce((method.__name__, args))
        return method(policy, *args, **kwargs)

    announced.__name__, announced.__doc__ = method.__name__, method.__doc__
    return announced


def keep_to_threads(settings: TrainerSettings) -> None:
    """A CPU trainer process keeps to `trainer.cpu_threads` (None: torch's default). Torch's
    thread count is the whole process's, so the processes that train call this at their
    start (`sentinel trainer`, `sft`, `usersim finetune`); a Policy never sets it, so one
    built in a test or a benchmark leaves its host's threads alone."""
    if settings.cpu_threads and pick_device(settings.device).type == "cpu":
        torch.set_num_threads(settings.cpu_threads)


class Policy:
    def __init__(
        self, settings: TrainerSettings, model_dir: Path, world: World | None = None
    ) -> None:
        """`world`: this process among torchrun's trainers (sharded with FSDP2 when more than
        one); None: a world of one on `trainer.device`."""
        map_large_allocations()
        self.settings = settings
        self.model_dir = model_dir
        self.world = world or World(device=pick_device(settings.device))
        self.device = self.world.device
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        torch.manual_seed(settings.seed)
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model = model.to(self.device)
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        if not settings.full_finetune:
            model = get_peft_model(model, self.lora_config())
        if self.world.sharded:
            shard(model, self.world)
        self.model: torch.nn.Module = model
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        template = settings.chat_template
        self.chat_template = template.read_text() if template else default_template()
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=settings.learning_rate,
            weight_decay=settings.weight_decay,
        )
        self.algorithm = algorithm(settings)
        # Plain PPO's ratio is against the server's logprobs already: no TIS on top.
        tis_cap = settings.tis_cap if settings.decoupled else None
        self.loss_config = LossConfig(
            settings.epsilon_low, settings.epsilon_high, tis_cap, settings.kl_beta
        )
        self.last_updates: list[LossStats] = []  # the last step's, one per optimizer update
        self._grammars: GrammarReplay | None = None
        self.leading = False  # announcing collective calls to followers (`lead`)
        self.step = 0
        self.version = 0  # the policy version the current weights are

    def lora_config(self) -> LoraConfig:
        s = self.settings
        return LoraConfig(
            r=s.lora_rank, lora_alpha=s.lora_alpha, target_modules=s.lora_targets,
            lora_dropout=0.0, task_type="CAUSAL_LM",
        )  # fmt: skip

    def follow(self) -> None:
        """Ranks other than 0 under torchrun: make each collective call rank 0 announces
        (steps, checkpoints, adapters, restores) until it dismisses them."""
        while (call := self.world.receive())[0] != STOP:
            name, args = call
            if name not in COLLECTIVE:
                raise RuntimeError(f"rank 0 announced {name!r}, not a collective call")
            getattr(self, name)(*args)

    def lead(self) -> None:
        """Rank 0 of a sharded world: announce each collective call from now on, for ranks in
        `follow` (the trainer); without it, every rank makes the calls itself."""
        self.leading = self.world.sharded and self.world.main

    def dismiss(self) -> None:
        """Rank 0: let the following ranks return (the trainer stops)."""
        if self.leading:
            self.world.announce((STOP, ()))
            self.leading = False

    @collective
    def grpo_step(self, groups: Sequence[RolloutGroup]) -> TrainStepReport:
        """One step on `groups` (`updates_per_batch` optimizer updates); no update if every
        group was filtered or stale."""
        started = time.monotonic()
        s = self.settings
        batch = build_batch(
            groups, current_version=self.version, max_staleness=s.max_staleness,
            scale=s.advantage_scale, aggregation=s.loss_aggregation,
            partial_credit=s.partial_credit, algorithm=self.algorithm,
            exclude_simulator_faults=s.exclude_simulator_faults,
        )  # fmt: skip

        def loss(logp: torch.Tensor, rows: Tensors) -> tuple[torch.Tensor, LossStats]:
            old = reference(logp, rows, s.decoupled)
            return grpo_loss(logp, old, rows, self.loss_config, self._ref(rows))

        totals = self._train(self._mini_batches(batch.samples), loss)
        return TrainStepReport(
            **self._figures(totals, started), mean_reward=batch.mean_reward, groups=batch.groups,
            filtered_groups=batch.filtered_groups, stale_groups=batch.stale_groups,
            simulator_faults=batch.simulator_faults,
            trained_groups=batch.trained, dropped_groups=batch.dropped,
        )  # fmt: skip

    @collective
    def sft_step(self, examples: Sequence[SFTExample]) -> TrainStepReport:
        """One optimizer step of token-mean NLL on the examples' trained tokens (LEAFE's
        corrections, the user model's turns). An example the template cannot mask is skipped."""
        started = time.monotonic()
        samples: list[Sample] = []
        for example in examples:
            try:
                samples.append(tokenize(example, self.tokenizer, self.chat_template, "sft"))
            except TemplateError as error:
                log.warning("SFT example skipped", example=example.id, error=str(error))
        samples = [s for s in samples if any(s.loss_mask)]
        weigh(samples)
        totals = self._train([samples], sft_loss)
        return TrainStepReport(
            **self._figures(totals, started), mode="sft", groups=0, examples=len(samples)
        )

    def _mini_batches(self, samples: Sequence[Sample]) -> list[list[Sample]]:
        """`updates_per_batch` slices of the trajectories, in order, each weighed as a step of
        its own (fewer with fewer trajectories); the samples as built for one update."""
        count = self.settings.updates_per_batch
        if count == 1:
            return [list(samples)]
        ids = list(dict.fromkeys(sample.trajectory_id for sample in samples))
        minis: list[list[Sample]] = []
        for index in range(count):
            chosen = set(ids[index * len(ids) // count : (index + 1) * len(ids) // count])
            mini = [sample for sample in samples if sample.trajectory_id in chosen]
            tokens: Counter[str] = Counter()
            for sample in mini:
                tokens[sample.trajectory_id] += sum(sample.loss_mask)
            weights = self.algorithm.weights(tokens)
            if mini:
                minis.append([replace(s, weight=weights[s.trajectory_id]) for s in mini])
        return minis

    def _train(self, minis: Sequence[Sequence[Sample]], loss: Loss) -> dict[str, float]:
        """One optimizer update per mini-batch, accumulating its gradient over micro-batches;
        the step counts once if anything was trained."""
        self.model.train()
        s = self.settings
        prepared = [
            [collate(m, self.pad_id, self.device, self._replay(m)) for m in self._micro(mini)]
            for mini in minis
            if mini
        ]
        if len(prepared) > 1 and s.decoupled:
            self._proximal([t for update in prepared for t in update])
        totals = {"loss": 0.0, "clip": 0.0, "kl": 0.0, "tokens": 0.0}
        self.last_updates = [self._update(update, loss, totals) for update in prepared]
        totals["loss"] /= max(len(prepared), 1)  # each update's loss is its own aggregate
        if prepared:
            self.step += 1
            self.version += 1
        return totals

    def _replay(self, samples: Sequence[Sample]) -> GrammarReplay | None:
        """The grammar replay, built on the first guided sample (compiling xgrammar's
        tokenizer tables takes a moment, and free-format runs never need it)."""
        if not any(s.guided for s in samples):
            return None
        if self._grammars is None:
            model: Any = self.model
            vocab = int(model.get_output_embeddings().out_features)
            stops = stop_tokens(model, self.tokenizer)
            self._grammars = GrammarReplay(self.tokenizer, vocab, stops)
        return self._grammars

    def _micro(self, samples: Sequence[Sample]) -> list[list[Sample]]:
        return micro_batches(samples, self.settings.micro_batch_tokens, self.settings.share_prefix)

    def _update(self, micros: list[Tensors], loss: Loss, totals: dict[str, float]) -> LossStats:
        """Accumulate the gradient over `micros` and take one optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        own = {"loss": 0.0, "clip": 0.0, "kl": 0.0, "tis": 0.0, "tokens": 0.0}
        # Shared prefixes: every rank runs every group's, and its share of the rows after it.
        every = [(tensors, True) for tensors in micros]
        mine = every if self.settings.share_prefix else share(micros, *self._rank)
        for tensors, real in mine:
            for stats in self._backward(tensors, loss, real):
                own["loss"] += stats.loss
                own["clip"] += stats.clip_fraction * stats.tokens
                own["kl"] += stats.mismatch_kl * stats.tokens
                own["tis"] += stats.tis_mean * stats.tokens
                own["tokens"] += stats.tokens
        own = self.world.sum(own)  # each rank trained its share: the step's figures
        for key, value in own.items():
            totals[key] = totals.get(key, 0.0) + value
        if self.world.sharded:
            release(self.model)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
        self.optimizer.step()
        tokens = own["tokens"] or 1
        return LossStats(
            own["loss"], own["clip"] / tokens, own["kl"] / tokens, own["tis"] / tokens,
            int(own["tokens"]),
        )  # fmt: skip

    def _proximal(self, micros: list[Tensors]) -> None:
        """The policy's logprobs before the first update, held for the ratio of every one."""
        with torch.no_grad():
            for tensors in micros:
                tensors.proximal = policy_logprobs(self.model, tensors)

    def _figures(self, totals: dict[str, float], started: float) -> dict[str, Any]:
        tokens, duration = int(totals["tokens"]), time.monotonic() - started
        return {
            "step": self.step, "policy_version": self.version, "loss": totals["loss"],
            "clip_fraction": totals["clip"] / (tokens or 1),
            "approx_kl": totals["kl"] / (tokens or 1), "tokens": tokens,
            "tokens_per_s": tokens / duration, "peak_memory_mb": peak_memory_mb(self.device),
            "duration_s": duration,
        }  # fmt: skip

    @property
    def _rank(self) -> tuple[int, int]:
        return self.world.rank, self.world.size

    def _backward(self, tensors: Tensors, loss: Loss, real: bool = True) -> list[LossStats]:
        """Accumulate the micro-batch's gradient; its loss figures (one per chunk). Not `real`:
        padding, run with zero weight for FSDP's collectives, its figures left out."""
        if self.settings.share_prefix:  # on CPU a row at a time: attention is not fused there
            chunk = 0 if self.device.type == "cpu" else self.settings.micro_batch_tokens
            return backward_sharing_prefix(self.model, tensors, loss, chunk, *self._rank)
        tensors = tensors if real else silenced(tensors)
        value, stats = loss(policy_logprobs(self.model, tensors), tensors)
        value.backward()  # type: ignore[no-untyped-call]
        return [stats] if real else []

    def _ref(self, tensors: object) -> torch.Tensor | None:
        """Reference logprobs (the base model: adapter disabled) when KL is on."""
        if self.settings.kl_beta == 0 or not isinstance(self.model, PeftModel):
            return None
        with torch.no_grad(), self.model.disable_adapter():
            return policy_logprobs(self.model, tensors)  # type: ignore[arg-type]

    @collective
    def save_adapter(self, directory: Path) -> Path:
        """The weights vLLM loads: a peft adapter directory (or full weights). Sharded, every
        rank calls it (the weights are gathered) and rank 0 writes."""
        weights = full_weights(self.model) if self.world.sharded else None
        if self.world.main:
            staging = directory.with_name(directory.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            self._save_model(staging, weights)
            shutil.rmtree(directory, ignore_errors=True)
            staging.rename(directory)
        self.world.barrier()
        return directory.resolve()

    @collective
    def checkpoint(self, directory: Path, extra: dict[str, object]) -> None:
        """Adapter, optimizer and counters, written atomically; unsharded, so that any world
        size resumes from it (the optimizer's state by parameter name). Sharded, every rank
        calls it and rank 0 writes."""
        weights = full_weights(self.model) if self.world.sharded else None
        optimizer = full_optimizer(self.model, self.optimizer)
        if self.world.main:
            staging = directory.with_name(directory.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            self._save_model(staging / "model", weights)
            torch.save(optimizer, staging / "optimizer.pt")
            state = {"step": self.step, "version": self.version, **extra}
            (staging / STATE).write_text(json.dumps(state))
            shutil.rmtree(directory, ignore_errors=True)
            staging.rename(directory)
        self.world.barrier()

    def _save_model(self, directory: Path, weights: dict[str, torch.Tensor] | None) -> None:
        """save_pretrained, of the gathered `weights` when sharded."""
        model: Any = self.model
        if weights is None:
            model.save_pretrained(directory)
        else:
            model.save_pretrained(directory, state_dict=weights)

    @collective
    def restore(self, directory: Path) -> dict[str, object]:
        state: dict[str, object] = json.loads((directory / STATE).read_text())
        if self.world.sharded:
            load_weights(self.model, self._saved_weights(directory / "model"))
        elif isinstance(self.model, PeftModel):
            self.model.load_adapter(
                str(directory / "model"), adapter_name="default", is_trainable=True
            )
        else:
            weights = AutoModelForCausalLM.from_pretrained(directory / "model").state_dict()
            self.model.load_state_dict(weights)
        saved = torch.load(directory / "optimizer.pt", weights_only=True)
        load_optimizer(self.model, self.optimizer, saved)
        self.step = int(state["step"])  # type: ignore[call-overload]
        self.version = int(state["version"])  # type: ignore[call-overload]
        return state

    def _saved_weights(self, directory: Path) -> dict[str, torch.Tensor]:
        """The trained weights of a checkpoint, by this model's parameter names (read into an
        unsharded copy on CPU: a sharded model cannot load them itself)."""
        if isinstance(self.model, PeftModel):
            base = AutoModelForCausalLM.from_pretrained(self.model_dir)
            copy: Any = PeftModel.from_pretrained(base, str(directory), is_trainable=True)
        else:
            copy = AutoModelForCausalLM.from_pretrained(directory)
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in copy.state_dict().items() if k in names}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
