"""pass^k and pass@k over repeated trials, with tau2-bench's definitions.

pass^k is the chance that k trials of a task *all* succeed, C(c,k)/C(n,k), averaged over
tasks; it falls with k and measures reliability. pass@k is the chance that *at least one*
of k succeeds, 1 - C(n-c,k)/C(n,k); it rises with k and measures coverage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import comb

SUCCESS_TOLERANCE = 1e-6


def succeeded(reward: float) -> bool:
    return abs(reward - 1.0) <= SUCCESS_TOLERANCE


def pass_hat_k(trials: int, successes: int, k: int) -> float:
    if not 0 <= successes <= trials or not 1 <= k <= trials:
        raise ValueError(
            f"need 0 <= successes <= trials and 1 <= k <= trials ({successes}, {trials}, {k})"
        )
    return comb(successes, k) / comb(trials, k)


def pass_at_k(trials: int, successes: int, k: int) -> float:
    if not 0 <= successes <= trials or not 1 <= k <= trials:
        raise ValueError(
            f"need 0 <= successes <= trials and 1 <= k <= trials ({successes}, {trials}, {k})"
        )
    return 1.0 - comb(trials - successes, k) / comb(trials, k)


def pass_table(
    rewards: Mapping[str, Sequence[float]], max_k: int | None = None
) -> dict[str, dict[int, float]]:
    """{"pass^k": {k: mean over tasks}, "pass@k": {...}} for k = 1..min trials per task."""
    if not rewards:
        return {"pass^k": {}, "pass@k": {}}
    ks = range(1, min(max_k or 10**9, *(len(r) for r in rewards.values())) + 1)
    counts = [(len(r), sum(map(succeeded, r))) for r in rewards.values()]
    return {
        "pass^k": {k: sum(pass_hat_k(n, c, k) for n, c in counts) / len(counts) for k in ks},
        "pass@k": {k: sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks},
    }
