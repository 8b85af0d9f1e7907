"""Blaming the user simulator, on failures recorded from real runs (SmolLM2 as agent and user):
the rule reads each user turn; the Controller, the batch builder and the report act on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sentinel.agents.solver import error_observation
from sentinel.orchestrator.streams import Stream
from sentinel.report import build_report, render_report
from sentinel.schemas import RolloutGroup, Trajectory
from sentinel.training.batch import build_batch
from sentinel.usersim.rules import simulator_fault

RECORDED = Path(__file__).parent / "data" / "recorded_failures.jsonl"


@pytest.fixture
def recorded() -> list[Trajectory]:
    """Two failures whose user spoke as the agent, then one whose user stayed in role."""
    return [Trajectory.model_validate_json(line) for line in RECORDED.read_text().splitlines()]


def test_a_user_who_speaks_as_the_agent_takes_the_blame(recorded: list[Trajectory]) -> None:
    flipped, other, clean = recorded
    for failure in (flipped, other):
        assert simulator_fault(failure) == 'user turn 1: speaks as the agent: "I\'m here to help"'
    assert simulator_fault(clean) is None


def test_a_success_is_never_blamed(recorded: list[Trajectory]) -> None:
    won = recorded[0].reward.model_copy(update={"reward": 1.0})
    assert simulator_fault(recorded[0].model_copy(update={"reward": won})) is None


def test_tool_syntax_and_role_tags_in_a_user_turn_are_blamed(recorded: list[Trajectory]) -> None:
    clean = recorded[2]
    for said in ('{"name": "respond", "arguments": {}}', "Assistant: your order is cancelled"):
        messages = [m.model_copy(update={"content": said}) if m.role == "user" else m
                    for m in clean.messages]  # fmt: skip
        fault = simulator_fault(clean.model_copy(update={"messages": messages}))
        assert fault is not None
        assert "role tag or tool-call syntax" in fault


def test_the_agents_error_observations_are_not_the_users_words(
    recorded: list[Trajectory],
) -> None:
    """After a malformed turn the rollout tells the agent "[invalid action: ...]" as a user-
    role message with error set: its bracket is no tool syntax of the simulator's."""
    clean = recorded[2]
    observation = error_observation("output cut off at max_tokens before a tool call closed")
    assert observation.role == "user"
    blamed = clean.model_copy(update={"messages": [*clean.messages, observation]})
    assert simulator_fault(blamed) is None


def group_of(recorded: list[Trajectory]) -> RolloutGroup:
    """A blamed failure and a success of the same task: informative only with the failure."""
    failure = recorded[0]
    won = failure.model_copy(
        update={
            "id": failure.id + "-won",
            "reward": failure.reward.model_copy(update={"reward": 1.0}),
        }
    )
    return RolloutGroup(id="g", task_id=failure.task_id, policy_version=0,
                        trajectories=[failure, won])  # fmt: skip


@pytest.mark.parametrize("exclude", [False, True])
def test_the_batch_leaves_blamed_failures_out_of_the_advantages(
    recorded: list[Trajectory], exclude: bool
) -> None:
    batch = build_batch(
        [group_of(recorded)], current_version=0, max_staleness=1, scale="group",
        aggregation="token_mean", exclude_simulator_faults=exclude,
    )  # fmt: skip
    if exclude:  # the success alone has no variance to learn from
        assert batch.simulator_faults == 1
        assert batch.trained == []
        assert batch.filtered_groups == 1
    else:
        assert batch.simulator_faults == 0
        assert batch.trained == ["g"]


def test_the_report_counts_the_failures_the_simulator_caused(
    recorded: list[Trajectory], tmp_path: Path
) -> None:
    directory = tmp_path / "artifacts"
    directory.mkdir()
    lines = "".join(t.model_dump_json() + "\n" for t in recorded)
    (directory / f"{Stream.TRAJECTORIES.value}.jsonl").write_text(lines)
    report = build_report(tmp_path)
    assert report.failures == 3
    assert report.simulator_faults == {"speaks as the agent": 2}
    rendered = {str(row) for row in render_report(report).columns[1]._cells}
    assert "3, 2 (speaks as the agent 2)" in rendered
