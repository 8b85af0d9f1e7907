"""tau2's mock domain: a to-do list of users and tasks, with a five-line policy.

It is the fast fixture of the test suite (a rollout takes seconds) and the smallest complete
pack: copy this folder to add a domain. tau2 ships one split ("base") of nine tasks; this pack
holds out two of them as the test split.
"""

from __future__ import annotations

from sentinel.envs.pack import DomainPack

TEST = frozenset({"create_task_1_nl_eval", "impossible_task_1"})


class Mock(DomainPack):
    name = "mock"
    persona = "an assistant that manages a team's to-do list"

    def splits(self, splits: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
        every = frozenset().union(*splits.values())
        return {"train": every - TEST, "test": every & TEST}


PACK = Mock()
