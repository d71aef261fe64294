"""Differential-privacy accounting for the scores a participant shares.

Mechanism: each shared score vector (one public sample's row) is clipped to L2 norm
`clip`, then Gaussian noise of standard deviation `noise_multiplier * sensitivity` is added
to every entry. One participant's release in one round is its whole (n x classes) matrix;
replacing one of its private samples may change every row, so the matrix's L2 sensitivity
is 2 * clip * sqrt(n) (each row moves by at most 2 * clip). Nothing about how training
spreads a private sample's influence is assumed.

Each release is therefore a Gaussian mechanism with noise multiplier z, and a participant's
epsilon after k releases is that of k composed Gaussian mechanisms. Three accountants:

- 'pld': Google's dp-accounting, privacy-loss-distribution accountant (tight, numerical);
- 'rdp': dp-accounting's Renyi-DP accountant (an upper bound, looser);
- 'gdp': the closed form of Gaussian differential privacy (Dong, Roth & Su, 2019), which is
  exact for composed Gaussian mechanisms: k releases are (sqrt(k)/z)-GDP, and mu-GDP is
  (epsilon, delta)-DP exactly on delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)
  (Balle & Wang's analytic Gaussian curve), inverted here in log space so that it holds for
  any mu (a large mu used to underflow).
'auto' uses 'pld' when dp-accounting is installed (`pip install -e ".[privacy]"`), else 'gdp'.
For this mechanism the two agree (tests/test_privacy.py).

Participation (train.participation < 1) is credited by counting each participant's actual
releases: one that sat a round out released nothing that round. It is not credited as
privacy amplification by subsampling (the Poisson-subsampled Gaussian of DP-SGD): that
needs the sampling to be secret from whoever sees the releases, and here the aggregator
sees who sent scores, and the schedule follows from the run's seed, which config.json
records. With amplification the same run would claim a smaller epsilon than it has.

Noise: drawn from the run's seed by default (sharing.noise_seed='config') so runs repeat
exactly; anyone holding config.json can regenerate, and subtract, the noise. That is fine
in a simulation and wrong for a real release: sharing.noise_seed='secret' draws it from the
operating system's entropy instead (runs then differ in their noise).
"""

from __future__ import annotations

import math
from functools import lru_cache

RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])


def sensitivity(clip: float, samples: int) -> float:
    """L2 sensitivity of one participant's clipped score matrix (replace-one adjacency)."""
    return 2.0 * clip * math.sqrt(samples)


def has_dp_accounting() -> bool:
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(accountant: str) -> str:
    """The accountant actually used for `accountant` ('auto' picks)."""
    if accountant == "auto":
        return "pld" if has_dp_accounting() else "gdp"
    if accountant in ("pld", "rdp") and not has_dp_accounting():
        from fedmd_ray.errors import ConfigError

        raise ConfigError(
            f"sharing.accountant='{accountant}' uses Google's dp-accounting, which is not installed: "
            "pip install -e '.[privacy]' (or pip install dp-accounting), or use 'gdp' (exact for "
            "this mechanism, no extra)."
        )
    return accountant


def epsilon(noise_multiplier: float, releases: int, delta: float, accountant: str = "auto") -> float:
    """Epsilon at `delta` of `releases` Gaussian releases at `noise_multiplier`."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return _epsilon(float(noise_multiplier), int(releases), float(delta), resolve(accountant))


@lru_cache(maxsize=4096)
def _epsilon(z: float, k: int, delta: float, accountant: str) -> float:
    if accountant == "gdp":
        return epsilon_for_delta(delta, gdp_mu(z, k))
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), k)
    if accountant == "rdp":
        acc = rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS))
    else:
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=pld_interval(z, k))
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def pld_interval(z: float, k: int) -> float:
    """The PLD accountant's discretisation step for k releases at noise multiplier z: 1e-4,
    or coarser when the privacy loss spans a wide range. One release's loss spans about
    mu * (16 + mu) (mu = 1/z, tails to 8 standard deviations), k releases k times that; at a
    fixed 1e-4 a noise multiplier of 0.01 over 5 rounds meant a distribution of ~10^8 points
    and 18 GiB. Capped at 4 * 10^5 points, which costs well under 0.1 % of epsilon."""
    mu = 1.0 / z
    return max(1e-4, k * mu * (16.0 + mu) / 4e5)


# ---------------------------------------------------------------- Gaussian DP, closed form


def gdp_mu(noise_multiplier: float, rounds: int = 1) -> float:
    """mu of `rounds` Gaussian releases, each with noise = noise_multiplier x sensitivity."""
    if noise_multiplier <= 0:
        return math.inf
    return math.sqrt(rounds) / noise_multiplier


def log_phi(x: float) -> float:
    """log of the standard normal CDF, accurate far into the lower tail (where Phi itself
    underflows: Phi(-40) < 1e-300)."""
    if x > -30:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    # Asymptotic series: Phi(x) = phi(x)/|x| * (1 - 1/x^2 + 3/x^4 - 15/x^6 + 105/x^8 ...)
    x2 = x * x
    series = 1 - 1 / x2 + 3 / x2**2 - 15 / x2**3 + 105 / x2**4
    return -x2 / 2 - math.log(-x) - 0.5 * math.log(2 * math.pi) + math.log(series)


def delta_for_epsilon(epsilon: float, mu: float) -> float:
    """The smallest delta for which a mu-GDP mechanism is (epsilon, delta)-DP."""
    if math.isinf(mu):
        return 1.0
    if mu == 0:
        return 0.0
    a = log_phi(-epsilon / mu + mu / 2)
    b = epsilon + log_phi(-epsilon / mu - mu / 2)
    if b >= a:
        return 0.0
    # Phi(.) - e^eps Phi(.) = e^a (1 - e^(b - a)), without forming either tiny term.
    return math.exp(a) * -math.expm1(b - a)


def epsilon_for_delta(delta: float, mu: float) -> float:
    """The smallest epsilon for which a mu-GDP mechanism is (epsilon, delta)-DP."""
    if math.isinf(mu):
        return math.inf
    if mu == 0 or delta >= delta_for_epsilon(0.0, mu):
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_for_epsilon(hi, mu) > delta:
        lo, hi = hi, hi * 2.0
        if hi > 1e12:
            return math.inf
    for _ in range(200):
        mid = (lo + hi) / 2
        if delta_for_epsilon(mid, mu) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


def classic_gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """Dwork & Roth's Theorem A.1 bound for one release: sigma >= D sqrt(2 ln(1.25/delta))/eps,
    i.e. eps = sqrt(2 ln(1.25/delta)) / noise_multiplier (only valid for eps < 1). Kept to
    compare with the exact accountant, which is never worse."""
    return math.sqrt(2 * math.log(1.25 / delta)) / noise_multiplier
