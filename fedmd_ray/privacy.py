"""Differential-privacy accounting for the scores a participant shares.

Mechanism: each shared score vector (one public sample's row) is clipped to L2 norm
`clip`, then Gaussian noise of standard deviation `noise_multiplier * sensitivity` is added
to every entry. One participant's release in one round is its whole (n x classes) matrix;
replacing one of its private samples may change every row, so the matrix's L2 sensitivity
is 2 * clip * sqrt(n) (each row moves by at most 2 * clip). Nothing about how training
spreads a private sample's influence is assumed.

Accounting is exact, through Gaussian differential privacy (Dong, Roth & Su, 2019):
- a Gaussian mechanism with sensitivity D and noise sigma is mu-GDP with mu = D / sigma,
  so one round is (1 / noise_multiplier)-GDP (their Theorem 2.7);
- R rounds compose to sqrt(R) * mu-GDP (their Corollary 3.3);
- mu-GDP gives (epsilon, delta)-DP exactly when
  delta = Phi(-epsilon/mu + mu/2) - e^epsilon * Phi(-epsilon/mu - mu/2)
  (their Corollary 2.13; the same curve as Balle & Wang's analytic Gaussian mechanism, 2018,
  Theorem 8). We invert it for epsilon by bisection.
"""

from __future__ import annotations

import math


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def sensitivity(clip: float, samples: int) -> float:
    """L2 sensitivity of one participant's clipped score matrix (replace-one adjacency)."""
    return 2.0 * clip * math.sqrt(samples)


def gdp_mu(noise_multiplier: float, rounds: int = 1) -> float:
    """mu of `rounds` Gaussian releases, each with noise = noise_multiplier x sensitivity."""
    if noise_multiplier <= 0:
        return math.inf
    return math.sqrt(rounds) / noise_multiplier


def delta_for_epsilon(epsilon: float, mu: float) -> float:
    """The smallest delta for which a mu-GDP mechanism is (epsilon, delta)-DP."""
    if math.isinf(mu):
        return 1.0
    if mu == 0:
        return 0.0
    # e^eps * Phi(.) can overflow for large eps; the product is then ~0.
    tail = math.exp(epsilon + math.log(max(_phi(-epsilon / mu - mu / 2), 1e-300)))
    return max(0.0, _phi(-epsilon / mu + mu / 2) - tail)


def epsilon_for_delta(delta: float, mu: float) -> float:
    """The smallest epsilon for which a mu-GDP mechanism is (epsilon, delta)-DP."""
    if math.isinf(mu):
        return math.inf
    if mu == 0 or delta >= delta_for_epsilon(0.0, mu):
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_for_epsilon(hi, mu) > delta:
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    for _ in range(200):
        mid = (lo + hi) / 2
        if delta_for_epsilon(mid, mu) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def classic_gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """Dwork & Roth's Theorem A.1 bound for one release: sigma >= D sqrt(2 ln(1.25/delta))/eps,
    i.e. eps = sqrt(2 ln(1.25/delta)) / noise_multiplier (only valid for eps < 1). Kept to
    compare with the exact accountant, which is never worse."""
    return math.sqrt(2 * math.log(1.25 / delta)) / noise_multiplier
