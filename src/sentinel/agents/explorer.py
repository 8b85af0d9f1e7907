"""LEAFE's exploration: a group's failures reflected on, branched from the wrong step within a
budget, and the branches that recovered turned into SFT examples.

Budgets, the same a compared method gets: `branches_per_failure`, `max_depth` agent turns per
branch, and `max_interactions` agent turns across the group's branches. Each failure
reserves what its branches may spend before they start, so failures explore concurrently and
the total never exceeds the budget. A failure stops branching at its first accepted branch.

A correction is the original prefix plus the branch, rendered as the Solver renders it but
without the experience (the policy must learn to act so without being told), and without
malformed turns and the error notes they drew. Loss falls on every agent turn the policy
sampled: the greeting is scripted.
"""

from __future__ import annotations

import math

import anyio

from sentinel.agents.reflector import NothingToRedo, Reflector
from sentinel.agents.rollout import RolloutRunner
from sentinel.config import LeafeSettings
from sentinel.logs import get_logger
from sentinel.schemas import (
    ChatMessage,
    Correction,
    Exploration,
    Reflection,
    RolloutGroup,
    SFTExample,
    Task,
    TerminationReason,
    Trajectory,
)

log = get_logger(__name__)


def is_failure(trajectory: Trajectory) -> bool:
    """Failed by the agent: not a success, and not the endpoint's fault."""
    return not trajectory.succeeded and trajectory.termination != TerminationReason.INFRA_ERROR


def accepted(branch: Trajectory, original: Trajectory, rule: str) -> bool:
    if branch.succeeded:
        return True
    if rule != "improved" or branch.reward is None:
        return False
    before = original.reward
    reward, partial = (before.reward, before.partial) if before else (0.0, 0.0)
    return branch.reward.reward > reward or branch.reward.partial > partial


def clean(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Without malformed agent turns and the error notes that answered them."""
    return [m for m in messages if not (m.error and m.role in ("assistant", "user"))]


class Explorer:
    def __init__(
        self, runner: RolloutRunner, reflector: Reflector, settings: LeafeSettings
    ) -> None:
        self.runner = runner
        self.reflector = reflector
        self.settings = settings

    async def explore(
        self, task: Task, group: RolloutGroup, time_limit_s: float = math.inf
    ) -> Exploration:
        """Explore the group's failures; after `time_limit_s`, what was found so far (a worker's
        time limit must not cost the group itself)."""
        failures = [t for t in group.trajectories if is_failure(t)]
        exploration = Exploration(failures=len(failures))
        left = self.settings.max_interactions
        per_failure = self.settings.branches_per_failure * self.settings.max_depth
        with anyio.move_on_after(time_limit_s) as scope:
            async with anyio.create_task_group() as tg:
                for trajectory in failures:
                    if left <= 0:
                        break
                    reserved = min(per_failure, left)
                    left -= reserved
                    tg.start_soon(self._failure, task, trajectory, reserved, exploration)
        if scope.cancelled_caught:
            exploration.cut_short = f"time limit of {time_limit_s:.0f} s"
        return exploration

    async def _failure(
        self, task: Task, trajectory: Trajectory, budget: int, exploration: Exploration
    ) -> None:
        try:
            reflection = await self.reflector.reflect(task, trajectory)
        except NothingToRedo:
            return
        exploration.reflected += 1
        for index in range(self.settings.branches_per_failure):
            turns = min(self.settings.max_depth, budget)
            if turns <= 0:
                return
            branch = await self.runner.branch(
                task, trajectory, reflection.backtrack_step, reflection.experience, turns,
                trajectory_id=f"{trajectory.id}-b{index}",
            )  # fmt: skip
            spent = sum(m.role == "assistant" for m in branch.messages[reflection.backtrack_step :])
            budget -= spent
            exploration.branches += 1
            exploration.interactions += spent
            if not accepted(branch, trajectory, self.settings.accept):
                continue
            correction = self.correction(task, trajectory, branch, reflection)
            if correction is not None:
                exploration.recovered += branch.succeeded
                exploration.corrections.append(correction)
                log.info(
                    "failure recovered", trajectory=trajectory.id, step=reflection.backtrack_step,
                    reward=branch.reward.reward if branch.reward else 0.0, branch=index,
                )  # fmt: skip
                return

    def correction(
        self, task: Task, original: Trajectory, branch: Trajectory, reflection: Reflection
    ) -> Correction | None:
        """The branch as an SFT example; None if no agent turn of it is fit to learn."""
        messages = clean(branch.messages)
        rendered = self.runner.solver.render(messages)  # no experience: it is removed
        trained = [i + 1 for i, m in enumerate(messages) if i > 0 and m.role == "assistant"]
        if not trained:
            return None
        example = SFTExample(
            id=f"correction-{branch.id}", source="leafe", task_id=task.id, messages=rendered,
            tools=self.runner.solver.tools, trained=trained,
        )  # fmt: skip
        reward = branch.reward
        return Correction(
            trajectory_id=original.id, backtrack_step=reflection.backtrack_step,
            experience=reflection.experience, reward=reward.reward if reward else 0.0,
            partial=reward.partial if reward else 0.0, example=example,
        )  # fmt: skip
