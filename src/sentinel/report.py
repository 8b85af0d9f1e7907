"""`sentinel report`: the story of a run, rebuilt from the JSONL in its run directory.

The figures: patterns found and how often each recurred per policy version, tasks proposed
and accepted (with the top rejection reasons), rollouts, train steps, policy versions,
held-out pass^k and pass@k per version, and what LEAFE explored and distilled. `problems()`
checks that the record is whole: every accepted task traces to a pattern, every trained
trajectory to a task and a policy version, and every rollout group was trained exactly once
or dropped with a reason. A group the orchestrator wrote off (its worker died) is in the
record as a dropped group with its reason, like one a worker dropped. Held-out groups
(`purpose` eval) are evaluation trials: they are in `evals`, not among the groups.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from rich.table import Table

from sentinel import jsonl
from sentinel.config import ConfigError, load_settings
from sentinel.orchestrator.recorder import artifacts_dir
from sentinel.orchestrator.streams import CARRIES, Stream
from sentinel.schemas import (
    ErrorPattern,
    EvalReport,
    FailureDiagnosis,
    Message,
    Origin,
    PolicyVersion,
    RolloutGroup,
    Task,
    TaskProposal,
    TrainStepReport,
    Trajectory,
    ValidationResult,
)
from sentinel.usersim.rules import simulator_fault

M = TypeVar("M", bound=Message)

# Who wrote the pool's tasks: the Proposer's LLM for a pattern (`proposed`), seed mutation, or
# the LLM for no pattern (the synthetic baseline).
ORIGIN_NAMES = {
    Origin.PROPOSED: "llm", Origin.MUTATED: "mutation",
    Origin.SYNTHETIC: "synthetic", Origin.SEED: "seed",
}  # fmt: skip


class PatternTrend(BaseModel):
    id: str
    title: str
    category: str
    share: dict[int, float]  # policy version -> share of that version's failures
    trained_groups: int = 0  # groups trained on tasks proposed for this pattern


class LeafeFigures(BaseModel):
    """LEAFE's exploration summed over the run's groups, and the SFT it led to."""

    failures: int = 0
    reflected: int = 0
    branches: int = 0
    interactions: int = 0  # agent turns spent in branches
    recovered: int = 0  # failures a branch turned into a tau2 success
    corrections: int = 0  # accepted branches, distilled as SFT examples
    sft_steps: int = 0
    sft_examples: int = 0


class RunReport(BaseModel):
    run_dir: str
    patterns: list[PatternTrend]
    categories: dict[int, dict[str, float]]  # version -> failure category -> share
    proposals: int
    accepted: int
    top_rejections: dict[str, int]
    tasks_by_origin: dict[str, int]
    rollouts: int
    failures: int = 0  # failed rollouts recorded
    simulator_faults: dict[str, int] = {}  # failures blamed on the user simulator: why -> count
    groups: int
    dropped_groups: int
    drop_reasons: dict[str, int] = {}  # the most common reasons groups were dropped
    informative_groups: int
    train_steps: int  # GRPO steps that updated the weights
    policy_versions: list[int]
    trainer_idle_fraction: float | None
    evals: dict[int, dict[int, float]]  # version -> pass^k
    evals_at_k: dict[int, dict[int, float]] = {}  # version -> pass@k
    eval_infra_errors: dict[int, int] = {}  # version -> trials left out of pass^k
    leafe: LeafeFigures | None = None  # None: no group was explored


class Artifacts:
    """The messages a run recorded, by stream (the last copy of each key wins)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.directory = artifacts_dir(run_dir)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{run_dir} has no artifacts/ directory: is it a run?")
        self.torn = 0  # lines that did not parse

    def read(self, stream: Stream, model: type[M]) -> list[M]:
        assert CARRIES[stream] is model
        latest: dict[str, M] = {}
        for line in jsonl.lines(self.directory / f"{stream.value}.jsonl"):
            try:
                message = model.model_validate_json(line)
            except ValidationError:  # a line torn by a crash or a full disk
                self.torn += 1
                continue
            latest[message.key()] = message
        return list(latest.values())


def build_report(run_dir: Path) -> RunReport:
    a = Artifacts(run_dir)
    partial_credit = _partial_credit(run_dir)
    trajectories = a.read(Stream.TRAJECTORIES, Trajectory)
    diagnoses = a.read(Stream.DIAGNOSES, FailureDiagnosis)
    groups = _training_groups(a)
    verdicts = a.read(Stream.VALIDATIONS, ValidationResult)
    reports = a.read(Stream.TRAIN_REPORTS, TrainStepReport)
    evals = a.read(Stream.EVALUATIONS, EvalReport)
    waited = sum(r.wait_s for r in reports)
    busy = waited + sum(r.duration_s for r in reports)
    return RunReport(
        run_dir=str(run_dir),
        patterns=_trends(
            a.read(Stream.PATTERNS, ErrorPattern),
            diagnoses,
            _trained_per_pattern(a, groups, reports),
        ),
        categories=_category_shares(diagnoses),
        proposals=len(a.read(Stream.PROPOSALS, TaskProposal)),
        accepted=sum(v.accepted for v in verdicts),
        top_rejections=dict(
            Counter(r.code.value for v in verdicts for r in v.reasons).most_common(5)
        ),
        tasks_by_origin=dict(
            Counter(ORIGIN_NAMES[t.provenance.origin] for t in a.read(Stream.TASKS, Task))
        ),
        rollouts=len(trajectories),
        failures=sum(not t.succeeded for t in trajectories),
        simulator_faults=_simulator_faults(trajectories),
        groups=len(groups),
        dropped_groups=sum(g.dropped is not None for g in groups),
        drop_reasons=dict(Counter(g.dropped for g in groups if g.dropped).most_common(5)),
        informative_groups=sum(g.informative(partial_credit) for g in groups),
        train_steps=sum(r.tokens > 0 and r.mode == "grpo" for r in reports),
        policy_versions=sorted(
            {0} | {v.version for v in a.read(Stream.POLICY_VERSIONS, PolicyVersion)}
        ),
        trainer_idle_fraction=waited / busy if busy else None,
        evals={e.policy_version or 0: e.pass_hat_k for e in evals},
        evals_at_k={e.policy_version or 0: e.pass_at_k for e in evals},
        eval_infra_errors={e.policy_version or 0: e.infra_errors for e in evals},
        leafe=_leafe(groups, reports),
    )


def _simulator_faults(trajectories: list[Trajectory]) -> dict[str, int]:
    """Failures the user simulator caused, by the kind of fault (its reason's rule)."""
    kinds: Counter[str] = Counter()
    for trajectory in trajectories:
        if fault := simulator_fault(trajectory):
            kinds[fault.split(": ", 2)[1]] += 1
    return dict(kinds.most_common())


def _training_groups(a: Artifacts) -> list[RolloutGroup]:
    """The rollout groups of the loop's budget, without the held-out evaluation's."""
    return [g for g in a.read(Stream.ROLLOUT_GROUPS, RolloutGroup) if g.purpose == "train"]


def _leafe(groups: list[RolloutGroup], reports: list[TrainStepReport]) -> LeafeFigures | None:
    explored = [g.exploration for g in groups if g.exploration is not None]
    if not explored:
        return None
    sft = [r for r in reports if r.mode == "sft" and r.tokens]
    return LeafeFigures(
        failures=sum(e.failures for e in explored), reflected=sum(e.reflected for e in explored),
        branches=sum(e.branches for e in explored),
        interactions=sum(e.interactions for e in explored),
        recovered=sum(e.recovered for e in explored),
        corrections=sum(len(e.corrections) for e in explored),
        sft_steps=len(sft), sft_examples=sum(r.examples for r in sft),
    )  # fmt: skip


def _partial_credit(run_dir: Path) -> float:
    """The run's `trainer.partial_credit` (its config.yaml), which decides informativeness."""
    try:
        return load_settings(run_dir / "config.yaml").trainer.partial_credit
    except ConfigError:
        return 0.0


def _failures_per_version(diagnoses: list[FailureDiagnosis]) -> Counter[int]:
    return Counter(d.policy_version for d in diagnoses)


def _trained_per_pattern(
    a: Artifacts, groups: list[RolloutGroup], reports: list[TrainStepReport]
) -> Counter[str]:
    """How many trained groups ran on tasks proposed for each pattern (provenance)."""
    pattern_of = {t.id: t.provenance.pattern_id for t in a.read(Stream.TASKS, Task)}
    task_of = {g.id: g.task_id for g in groups}
    trained = [task_of.get(g) for r in reports for g in r.trained_groups]
    return Counter(p for t in trained if t and (p := pattern_of.get(t)))


def _trends(
    patterns: list[ErrorPattern], diagnoses: list[FailureDiagnosis], trained: Counter[str]
) -> list[PatternTrend]:
    """Each pattern's share of its version's failures (its newest copy has every count), and
    how much the Solver trained on its tasks: did the share fall after?"""
    failures = _failures_per_version(diagnoses)
    newest: dict[str, ErrorPattern] = {}
    for pattern in patterns:
        if pattern.id not in newest or pattern.updated_at > newest[pattern.id].updated_at:
            newest[pattern.id] = pattern
    return [
        PatternTrend(
            id=p.id,
            title=p.title,
            category=p.category.value,
            share={v: n / max(failures[v], 1) for v, n in sorted(p.frequency.items())},
            trained_groups=trained[p.id],
        )
        for p in sorted(newest.values(), key=lambda p: -sum(p.frequency.values()))
    ]


def _category_shares(diagnoses: list[FailureDiagnosis]) -> dict[int, dict[str, float]]:
    failures = _failures_per_version(diagnoses)
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    for d in diagnoses:
        counts[d.policy_version][d.category.value] += 1
    return {v: {c: n / failures[v] for c, n in counts[v].most_common()} for v in sorted(counts)}


def problems(run_dir: Path, seed_ids: set[str]) -> list[str]:
    """What breaks the run's record; empty when it is whole."""
    return list(_problems(Artifacts(run_dir), seed_ids))


def _problems(a: Artifacts, seed_ids: set[str]) -> Iterator[str]:
    pattern_ids = {p.id for p in a.read(Stream.PATTERNS, ErrorPattern)}
    task_ids = set(seed_ids)
    for task in a.read(Stream.TASKS, Task):
        task_ids.add(task.id)
        if task.provenance.origin != Origin.SEED and task.provenance.pattern_id not in pattern_ids:
            yield f"accepted task {task.id} names no recorded pattern"
    versions = {0} | {v.version for v in a.read(Stream.POLICY_VERSIONS, PolicyVersion)}
    groups = {g.id: g for g in _training_groups(a)}
    fate: dict[str, list[str]] = defaultdict(list)
    for report in a.read(Stream.TRAIN_REPORTS, TrainStepReport):
        for group_id in report.trained_groups:
            fate[group_id].append(f"trained in step {report.step}")
        for group_id, reason in report.dropped_groups.items():
            fate[group_id].append(f"dropped ({reason})")
    for group_id, group in groups.items():
        if len(fate[group_id]) != 1:
            yield f"rollout group {group_id}: {fate[group_id] or 'never trained nor dropped'}"
        for t in group.trajectories:
            if t.task_id not in task_ids or t.policy_version not in versions:
                yield f"trajectory {t.id}: unknown task {t.task_id} or version {t.policy_version}"
    yield from (f"train report names unknown group {g}" for g in fate.keys() - groups.keys())


def _faults(report: RunReport) -> str:
    blamed = sum(report.simulator_faults.values())
    kinds = ", ".join(f"{kind} {n}" for kind, n in report.simulator_faults.items())
    return f"{report.failures}, {blamed}" + (f" ({kinds})" if kinds else "")


def render_report(report: RunReport) -> Table:
    table = Table(title=f"run {report.run_dir}", show_header=False)
    rejections = ", ".join(f"{c} {n}" for c, n in report.top_rejections.items()) or "-"
    origins = ", ".join(f"{o} {n}" for o, n in report.tasks_by_origin.items()) or "-"
    rows = [
        ("patterns found", str(len(report.patterns))),
        ("tasks proposed / accepted", f"{report.proposals} / {report.accepted}"),
        ("top rejections", rejections),
        ("accepted tasks by origin", origins),
        ("rollouts (groups, dropped, informative)",
         f"{report.rollouts} ({report.groups}, {report.dropped_groups}, "
         f"{report.informative_groups})"),
        ("failed rollouts, user simulator's fault", _faults(report)),
        ("train steps (GRPO)", str(report.train_steps)),
        ("policy versions", ", ".join(map(str, report.policy_versions))),
    ]  # fmt: skip
    if report.drop_reasons:
        reasons = "; ".join(f"{r} ({n})" for r, n in report.drop_reasons.items())
        rows.append(("dropped groups, why", reasons))
    if report.trainer_idle_fraction is not None:
        rows.append(("trainer idle", f"{report.trainer_idle_fraction:.0%}"))
    if (x := report.leafe) is not None:
        rows.append(
            (
                "LEAFE failures / reflected / branches (turns)",
                f"{x.failures} / {x.reflected} / {x.branches} ({x.interactions})",
            )
        )
        rows.append(
            (
                "LEAFE recovered / corrections / SFT steps (examples)",
                f"{x.recovered} / {x.corrections} / {x.sft_steps} ({x.sft_examples})",
            )
        )
    for version, table_k in sorted(report.evals.items()):
        at_k = report.evals_at_k.get(version, {})
        figures = "  ".join(
            f"pass^{k} {v:.3f} pass@{k} {at_k.get(k, 0.0):.3f}" for k, v in sorted(table_k.items())
        )
        if lost := report.eval_infra_errors.get(version):
            figures += f"  ({lost} trials lost to infrastructure errors, left out)"
        rows.append((f"held-out, policy v{version}", figures))
    for trend in report.patterns[:8]:
        shares = "  ".join(f"v{v}: {s:.0%}" for v, s in trend.share.items())
        rows.append((f"pattern {trend.title[:40]}", f"{shares}  (trained {trend.trained_groups})"))
    for key, value in rows:
        table.add_row(key, value)
    return table
