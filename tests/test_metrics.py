from __future__ import annotations

import itertools

import pytest
from tau2.metrics.agent_metrics import is_successful
from tau2.metrics.agent_metrics import pass_hat_k as tau2_pass_hat_k

from sentinel.metrics import pass_at_k, pass_hat_k, pass_table, succeeded


def test_pass_hat_k_equals_tau2_on_every_count() -> None:
    for trials in range(1, 9):
        for successes, k in itertools.product(range(trials + 1), range(1, trials + 1)):
            assert pass_hat_k(trials, successes, k) == tau2_pass_hat_k(trials, successes, k)


def test_success_tolerance_matches_tau2() -> None:
    for reward in (1.0, 1 - 1e-7, 1 + 1e-7, 1 - 1e-5, 0.0, 0.5):
        assert succeeded(reward) == is_successful(reward)


def test_pass_hat_falls_and_pass_at_rises_with_k() -> None:
    table = pass_table({"a": [1, 0, 1, 1], "b": [0, 0, 0, 1], "c": [1, 1, 1, 1]})
    hat, at = table["pass^k"], table["pass@k"]
    assert hat[1] == at[1] == pytest.approx((3 / 4 + 1 / 4 + 1) / 3)
    assert hat[4] == pytest.approx(1 / 3)  # only c always succeeds
    assert at[4] == pytest.approx(1.0)
    assert list(hat.values()) == sorted(hat.values(), reverse=True)
    assert list(at.values()) == sorted(at.values())


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="successes <= trials"):
        pass_hat_k(2, 3, 1)
    with pytest.raises(ValueError, match="k <= trials"):
        pass_at_k(2, 1, 3)
