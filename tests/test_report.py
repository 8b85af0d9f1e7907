"""`sentinel report` over a hand-made record: the figures, and every way a record can break."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from sentinel.orchestrator.streams import CARRIES, Stream
from sentinel.report import build_report, problems, render_report
from sentinel.schemas import (
    ChatMessage,
    EvalReport,
    Message,
    Origin,
    PolicyVersion,
    Provenance,
    RejectionCode,
    RejectionReason,
    RolloutGroup,
    TrainStepReport,
    ValidationResult,
)
from tests.factories import examples, group, task


def write(run_dir: Path, stream: Stream, *messages: Message) -> None:
    directory = run_dir / "artifacts"
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{stream.value}.jsonl").open("a") as f:
        for message in messages:
            assert isinstance(message, CARRIES[stream])
            f.write(message.model_dump_json() + "\n")


def report(step: int, trained: list[str], dropped: dict[str, str] | None = None) -> TrainStepReport:
    template = next(m for m in examples() if isinstance(m, TrainStepReport))
    return template.model_copy(
        update={"step": step, "trained_groups": trained, "dropped_groups": dropped or {}}
    )


def record(run_dir: Path) -> None:
    pattern = next(m for m in examples() if type(m).__name__ == "ErrorPattern")
    targeted = task(7).model_copy(
        update={"provenance": Provenance(origin=Origin.PROPOSED, pattern_id=pattern.id)}
    )
    write(run_dir, Stream.PATTERNS, pattern)
    write(run_dir, Stream.TASKS, targeted)
    write(run_dir, Stream.POLICY_VERSIONS, PolicyVersion(version=1, served_name="policy-v1",
                                                         base_model="smol"))  # fmt: skip
    write(
        run_dir, Stream.ROLLOUT_GROUPS,
        group("retail-0", [1.0, 0.0], 1), group(targeted.id, [0.0, 0.0], 2),
    )  # fmt: skip
    write(
        run_dir, Stream.TRAIN_REPORTS,
        report(1, ["g-retail-0-1"]), report(1, [], {"g-retail-7-2": "uninformative"}),
    )  # fmt: skip
    rejected = RejectionReason(code=RejectionCode.GOLD_WRITE_FAILED, detail="no such order")
    write(
        run_dir, Stream.VALIDATIONS,
        ValidationResult(proposal_id="p1", task_id=targeted.id, accepted=True),
        ValidationResult(proposal_id="p2", task_id="x", accepted=False, reasons=[rejected]),
    )  # fmt: skip
    evaluation = next(m for m in examples() if isinstance(m, EvalReport))
    write(run_dir, Stream.EVALUATIONS, evaluation.model_copy(update={"policy_version": 0}))
    write(run_dir, Stream.EVALUATIONS, evaluation.model_copy(update={"policy_version": 1}))


def test_a_whole_record_has_no_problems_and_its_figures(tmp_path: Path) -> None:
    record(tmp_path)
    assert problems(tmp_path, {"retail-0"}) == []
    summary = build_report(tmp_path)
    assert (summary.groups, summary.rollouts, summary.informative_groups) == (2, 0, 1)
    assert (summary.accepted, summary.top_rejections) == (1, {"gold_write_failed": 1})
    assert summary.policy_versions == [0, 1]
    assert set(summary.evals) == {0, 1}
    assert summary.tasks_by_origin == {"llm": 1}  # by who wrote them: the LLM, for a pattern


def test_groups_trained_twice_or_never_and_orphans_are_problems(tmp_path: Path) -> None:
    record(tmp_path)
    write(tmp_path, Stream.TRAIN_REPORTS, report(2, ["g-retail-0-1"]))  # again
    write(tmp_path, Stream.ROLLOUT_GROUPS, group("retail-0", [0.0, 1.0], 3))  # never
    write(tmp_path, Stream.ROLLOUT_GROUPS, group("retail-9", [0.0, 1.0], 4, version=5))
    write(tmp_path, Stream.TRAIN_REPORTS, report(3, ["g-retail-9-4"]))
    orphan = task(8).model_copy(
        update={"provenance": Provenance(origin=Origin.PROPOSED, pattern_id="gone")}
    )
    write(tmp_path, Stream.TASKS, orphan)
    found = "\n".join(problems(tmp_path, {"retail-0"}))
    assert "g-retail-0-1: ['trained in step 1', 'trained in step 2']" in found
    assert "g-retail-0-3: never trained nor dropped" in found
    assert "unknown task retail-9 or version 5" in found
    assert "retail-8 names no recorded pattern" in found


def test_a_torn_line_is_skipped(tmp_path: Path) -> None:
    record(tmp_path)
    with (tmp_path / "artifacts" / "rollout_groups.jsonl").open("a") as f:
        f.write('{"id": "g-torn", "task_')
    assert build_report(tmp_path).groups == 2


def test_sampled_unicode_line_breaks_do_not_cut_a_recorded_message(tmp_path: Path) -> None:
    """JSON leaves U+2028, U+0085 and the like unescaped; `str.splitlines` would split there
    (a CI run lost a group to one U+2028 in a SmolLM2 turn)."""
    record(tmp_path)
    breaks = "\u2028 \u2029 \x85 \x0b \x0c"
    odd = group("retail-0", [0.0, 1.0], 3)
    first = odd.trajectories[0]
    said = ChatMessage(role="assistant", content=f"one{breaks}two")
    odd.trajectories[0] = first.model_copy(update={"messages": [*first.messages, said]})
    write(tmp_path, Stream.ROLLOUT_GROUPS, odd)
    write(tmp_path, Stream.TRAIN_REPORTS, report(2, ["g-retail-0-3"]))
    assert problems(tmp_path, {"retail-0"}) == []
    assert build_report(tmp_path).groups == 3


def test_leafe_figures_sum_the_groups_explorations_and_the_sft_steps(tmp_path: Path) -> None:
    record(tmp_path)
    assert build_report(tmp_path).leafe is None  # nothing explored
    explored = next(m for m in examples() if isinstance(m, RolloutGroup))
    assert explored.exploration is not None
    write(tmp_path, Stream.ROLLOUT_GROUPS, explored, explored.model_copy(update={"id": "g-2"}))
    sft = report(2, []).model_copy(update={"mode": "sft", "examples": 1, "tokens": 30})
    write(tmp_path, Stream.TRAIN_REPORTS, sft, report(2, [explored.id, "g-2"]))
    leafe = build_report(tmp_path).leafe
    assert leafe is not None
    assert (leafe.failures, leafe.branches, leafe.interactions) == (2, 4, 10)
    assert (leafe.recovered, leafe.corrections, leafe.sft_steps, leafe.sft_examples) == (2, 2, 1, 1)
    summary = build_report(tmp_path)
    assert summary.train_steps == 3  # GRPO steps only; the SFT step is counted apart
    assert summary.evals_at_k[1] == {1: 0.4, 2: 0.5}


def test_written_off_groups_are_dropped_with_their_reason_and_held_out_groups_apart(
    tmp_path: Path,
) -> None:
    record(tmp_path)
    written_off = RolloutGroup(
        id="g-lost", task_id="retail-0", policy_version=1, trajectories=[],
        dropped="worker lost: its lease lapsed on attempt 3 of 3",
    )  # fmt: skip
    held_out = group("retail-5", [1.0, 0.0], 9, version=1).model_copy(update={"purpose": "eval"})
    write(tmp_path, Stream.ROLLOUT_GROUPS, written_off, held_out)
    write(
        tmp_path, Stream.TRAIN_REPORTS, report(2, [], {"g-lost": f"rollout: {written_off.dropped}"})
    )
    evaluation = next(m for m in examples() if isinstance(m, EvalReport))
    write(
        tmp_path,
        Stream.EVALUATIONS,
        evaluation.model_copy(update={"policy_version": 1, "infra_errors": 2}),
    )
    assert problems(tmp_path, {"retail-0"}) == []  # the held-out group is not a training group
    summary = build_report(tmp_path)
    assert (summary.groups, summary.dropped_groups) == (3, 1)
    assert summary.drop_reasons == {"worker lost: its lease lapsed on attempt 3 of 3": 1}
    assert summary.eval_infra_errors == {0: 0, 1: 2}
    console = Console(width=200, record=True)
    console.print(render_report(summary))
    shown = console.export_text()
    assert "worker lost: its lease lapsed on attempt 3 of 3 (1)" in shown
    assert "2 trials lost to infrastructure errors" in shown
