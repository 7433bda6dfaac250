"""The minimal-norm benchmark's AttackBench optimality and peer ratios, on hand-made per-example norms."""

import math

import numpy as np
import pytest

from benchmarks.minimal_norm_report import best_distances, optimality, peer_ratios, summarize

INF = float("inf")


def test_optimality_is_one_at_the_best_and_zero_for_an_attack_that_fails_everywhere():
    best = np.array([0.1, 0.2, 0.4])
    assert optimality(best, best) == pytest.approx(1.0)
    assert optimality(np.full(3, INF), best) == pytest.approx(0.0)


def test_optimality_is_the_exact_area_between_the_step_curves():
    best = np.array([0.1, 0.2, 0.4])            # D = 0.4, A* = mean(0.1, 0.2, 0.4) = 0.7 / 3
    d = np.array([0.2, 0.2, INF])               # A = mean(0.2, 0.2, 0.4) = 0.8 / 3
    a_best, a, D = 0.7 / 3, 0.8 / 3, 0.4
    assert optimality(d, best) == pytest.approx(1 - (a - a_best) / (D - a_best))
    # The area of r(eps) = fraction with d > eps on [0, D], integrated numerically, is the same A.
    eps = np.linspace(0, D, 400001)
    r = (np.minimum(d, 10)[None, :] > eps[:, None]).mean(1)
    assert np.trapezoid(r, eps) == pytest.approx(a, abs=1e-5)


def test_best_and_peer_ratios_pair_the_same_points():
    rows = [
        {"model": "m", "name": "ours FMN-l2 @100", "method": "FMN", "norm": "l2", "library": "robustbench_lab",
         "budget": 100, "n": 4, "seconds": 4.0, "indices": [0, 1, 2, 3], "dist": [0.1, 0.2, 0.3, INF]},
        {"model": "m", "name": "foolbox FMN-l2 @100", "method": "FMN", "norm": "l2", "library": "foolbox",
         "budget": 100, "n": 2, "seconds": 1.0, "indices": [1, 3], "dist": [0.4, 0.5]},
    ]
    best = best_distances(rows)[("m", "l2")]
    assert best == {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.5}
    s = summarize(rows)
    peer_ratios(s, rows)
    ours = s[0]
    assert ours["points_vs_foolbox"] == 2                       # indices 1 and 3
    assert ours["median_vs_foolbox"] == pytest.approx(0.2 / 0.4)  # both broke index 1 only
    assert ours["success_vs_foolbox"] == pytest.approx(0.5 - 1.0)
    assert ours["time_vs_foolbox"] == pytest.approx((4.0 / 4) / (1.0 / 2))
    assert s[1]["success_rate"] == 1.0 and math.isclose(s[1]["median"], 0.45)
