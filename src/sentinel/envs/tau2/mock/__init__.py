"""tau2's mock domain: a to-do list of users and tasks, with a five-line policy.

It is the fast fixture of the test suite (a rollout takes seconds: its prompt is short) and
the smallest complete pack: copy this folder to add a domain. A pack is
- this class: the persona, the state rules (none here: mock's tools only check that the user
  or task exists, and the status is typed), the phrasing (`phrasing.py`) and the splits;
- a grounder (`grounding.py`), which the Proposer uses to write tasks on real entities;
- a line in `envs.registry.PACKS`.

tau2 ships one split ("base") of nine tasks. This pack's train split is the five whose gold
actions, replayed, score 1 and a conversation without them scores 0; its test split is the
two scored without gold writes: the request tau2 cannot serve (`impossible_task_1`, a
transfer to a human) and an update checked by an env assertion alone. Two are in neither,
as no reward can tell a good conversation from a bad one there:
- `create_task_1_nl_eval`: its only criteria are natural-language assertions, outside its
  reward basis, so every conversation scores 1;
- `create_task_1_with_env_assertions`: its assertion looks up the task the agent should have
  created and raises when there is none, so a failed conversation cannot be scored (its
  request is `create_task_1`'s anyway).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sentinel.envs.pack import DomainPack, Grounder
from sentinel.envs.tau2.mock.phrasing import PHRASING

if TYPE_CHECKING:
    from sentinel.envs.base import Environment

TEST = frozenset({"impossible_task_1", "update_task_with_history_and_env_assertions"})
UNSCORABLE = frozenset({"create_task_1_nl_eval", "create_task_1_with_env_assertions"})


class Mock(DomainPack):
    name = "mock"
    persona = "an assistant that manages a team's to-do list"
    policy_name = "the to-do list's policy"
    phrasing = PHRASING

    def grounder(self, env: Environment) -> Grounder:
        from sentinel.envs.tau2.mock.grounding import MockGrounder

        return MockGrounder(env)

    def splits(self, splits: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
        every = frozenset().union(*splits.values()) - UNSCORABLE
        return {"train": every - TEST, "test": every & TEST}


PACK = Mock()
