"""The Gaussian-DP accountant against closed forms."""

import math

import pytest

from fedmd_ray import privacy

# Standard normal CDF values from printed tables.
PHI = {-0.5: 0.3085375387, -1.5: 0.0668072013, 0.5: 0.6914624613}


def test_delta_at_epsilon_zero_is_total_variation():
    # delta(0) = Phi(mu/2) - Phi(-mu/2) for mu-GDP.
    assert privacy.delta_for_epsilon(0.0, 1.0) == pytest.approx(PHI[0.5] - PHI[-0.5], abs=1e-9)


def test_delta_matches_the_closed_form_at_mu_1_epsilon_1():
    expected = PHI[-0.5] - math.e * PHI[-1.5]
    assert privacy.delta_for_epsilon(1.0, 1.0) == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(0.1269373, abs=1e-6)


def test_epsilon_inverts_delta():
    for mu in (0.1, 0.5, 1.0, 3.0):
        for delta in (1e-3, 1e-5, 1e-8):
            eps = privacy.epsilon_for_delta(delta, mu)
            assert privacy.delta_for_epsilon(eps, mu) == pytest.approx(delta, rel=1e-6)


def test_composition_and_monotonicity():
    assert privacy.gdp_mu(2.0, rounds=16) == pytest.approx(4 / 2.0)
    assert privacy.gdp_mu(0.0) == math.inf and privacy.epsilon_for_delta(1e-5, math.inf) == math.inf
    one, twenty = (privacy.epsilon_for_delta(1e-5, privacy.gdp_mu(4.0, r)) for r in (1, 20))
    assert 0 < one < twenty
    assert privacy.epsilon_for_delta(1e-5, privacy.gdp_mu(8.0)) < one


def test_exact_accounting_is_never_worse_than_the_classic_bound():
    # Dwork & Roth Thm A.1 holds for eps < 1; the exact curve must be at least as tight.
    for noise in (5.0, 10.0, 50.0):
        classic = privacy.classic_gaussian_epsilon(noise, 1e-5)
        assert classic < 1
        assert privacy.epsilon_for_delta(1e-5, privacy.gdp_mu(noise)) <= classic


def test_sensitivity_of_a_clipped_matrix():
    assert privacy.sensitivity(clip=1.0, samples=100) == pytest.approx(20.0)
