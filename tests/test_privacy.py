"""The Gaussian-DP accountant against closed forms."""

import math

import numpy as np
import pytest

from fedmd_ray import privacy, sharing

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


def test_sensitivity_bounds_what_changing_one_private_sample_can_do():
    """Two participants' clipped score matrices as far apart as clipping allows (every row
    pointing the other way): their distance is what the noise must hide, and the accountant's
    sensitivity must cover it, with nothing to spare."""
    rng = np.random.default_rng(0)
    clip, n = 0.5, 100
    x = rng.normal(size=(n, 16)) * 10
    a = sharing.privatise(x, clip, 0.0, rng)
    b = sharing.privatise(-x, clip, 0.0, rng)
    distance = float(np.linalg.norm(a.astype(np.float64) - b))
    assert distance == pytest.approx(privacy.sensitivity(clip, n), rel=1e-5)
    # any other pair of clipped matrices is closer
    c = sharing.privatise(rng.normal(size=(n, 16)) * 10, clip, 0.0, rng)
    assert np.linalg.norm(a.astype(np.float64) - c) < privacy.sensitivity(clip, n)


# Epsilon at delta 1e-5 of one mu-GDP release for large mu (e.g. noise multiplier 0.1 over
# 20 rounds is mu = 44.72), from the analytic Gaussian curve evaluated in high precision. The
# previous accountant clamped Phi's underflow at 1e-300 and answered 686.7 / 690.8 / 690.8.
LARGE_MU = {35.0: 760.8, 44.7: 1188.7, 100.0: 5425.5}


@pytest.mark.parametrize("mu", list(LARGE_MU))
def test_large_mu_does_not_underflow(mu):
    eps = privacy.epsilon_for_delta(1e-5, mu)
    assert eps == pytest.approx(LARGE_MU[mu], abs=0.1)
    assert privacy.delta_for_epsilon(eps, mu) == pytest.approx(1e-5, rel=1e-6)


def test_log_phi_is_continuous_where_it_switches_to_the_series():
    for x in (-29.999, -30.0, -30.001):
        assert privacy.log_phi(x) == pytest.approx(
            -x * x / 2 - math.log(-x) - 0.5 * math.log(2 * math.pi), abs=2e-3
        )
    # the slope of log Phi at -30 is about 30: 2e-9 apart, the two sides differ by ~6e-8
    assert privacy.log_phi(-30.0 + 1e-9) == pytest.approx(privacy.log_phi(-30.0 - 1e-9), abs=1e-7)


def test_participation_is_credited_by_releases():
    full, half = (privacy.epsilon(2.0, k, 1e-5, "gdp") for k in (20, 10))
    assert half < full and privacy.epsilon(2.0, 0, 1e-5, "gdp") == 0.0
    assert privacy.epsilon(0.0, 3, 1e-5, "gdp") == math.inf


def test_gaussian_delta_against_numerical_integration():
    """delta(eps) of a mu-GDP release is the hockey-stick divergence between N(mu, 1) and
    N(0, 1): integrated here on a grid, independently of the closed form the code uses."""
    x = np.linspace(-40, 50, 2_000_001)
    for mu in (0.5, 1.0, 3.0):
        p = np.exp(-((x - mu) ** 2) / 2) / math.sqrt(2 * math.pi)
        q = np.exp(-(x**2) / 2) / math.sqrt(2 * math.pi)
        for eps in (0.0, 0.5, 2.0):
            numeric = float(np.trapezoid(np.maximum(0.0, p - math.exp(eps) * q), x))
            assert privacy.delta_for_epsilon(eps, mu) == pytest.approx(numeric, rel=1e-6, abs=1e-12)


needs_dp_accounting = pytest.mark.skipif(
    not privacy.has_dp_accounting(), reason="the [privacy] extra (dp-accounting) is not installed"
)


@needs_dp_accounting
def test_dp_accounting_rdp_gives_its_own_published_value():
    # dp-accounting's rdp_privacy_accountant_test: noise multiplier 4.530877117 is
    # (1, 1e-6)-DP by its RDP conversion (with a dense grid of orders; ours is coarser,
    # so at most slightly above).
    eps = privacy.epsilon(4.530877117, 1, 1e-6, "rdp")
    assert 1.0 <= eps <= 1.02


@needs_dp_accounting
def test_dp_accounting_pld_agrees_with_the_exact_closed_form():
    # One Gaussian release: the analytic curve is exact; PLD is tight up to its
    # discretisation; RDP is an upper bound.
    for z, k in ((4.530877117, 1), (1.0, 20), (0.5, 5), (0.1, 20)):
        exact = privacy.epsilon(z, k, 1e-5, "gdp")
        assert privacy.epsilon(z, k, 1e-5, "pld") == pytest.approx(exact, rel=2e-3, abs=1.0)
        assert privacy.epsilon(z, k, 1e-5, "rdp") >= exact - 1e-9


@needs_dp_accounting
def test_pld_discretisation_stays_bounded_for_tiny_noise():
    # A fixed 1e-4 step at noise multiplier 0.01 over 5 releases was ~10^8 points (18 GiB in
    # a driver); the step now grows with the loss's range, at a negligible cost in epsilon.
    for z, k in ((0.01, 5), (0.001, 5), (1.0, 20)):
        mu = 1 / z
        assert k * mu * (16 + mu) / privacy.pld_interval(z, k) <= 4e5 + 1
        assert privacy.epsilon(z, k, 1e-5, "pld") == pytest.approx(
            privacy.epsilon(z, k, 1e-5, "gdp"), rel=1e-3
        )
