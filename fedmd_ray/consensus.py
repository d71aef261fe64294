"""Forming the consensus from the participants' class scores on the public subset.

Each aggregator takes scores stacked as (participants, samples, classes) and returns
(samples, classes) float32 scores that the digest step treats as logits. FedMD's own is
`mean`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fedmd_ray.errors import ConfigError, ConsensusError, raised_at
from fedmd_ray.plugins import CONSENSUS, Code, parse_spec
from fedmd_ray.protocol import ConsensusPlan


def _softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def mean(scores: np.ndarray, weights: np.ndarray | None = None, **_: float) -> np.ndarray:
    """FedMD: the plain average of everyone's logits."""
    return scores.mean(axis=0)


def weighted(scores: np.ndarray, weights: np.ndarray | None = None, **_: float) -> np.ndarray:
    """Average weighted per participant (e.g. by private data size); equal weights = mean."""
    if weights is None:
        return mean(scores)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (scores.shape[0],) or np.any(w < 0) or w.sum() <= 0:
        raise ConsensusError(f"weights must be {scores.shape[0]} non-negative numbers, not all 0.")
    return np.tensordot(w / w.sum(), scores, axes=1)


def confidence(
    scores: np.ndarray, weights: np.ndarray | None = None, temperature: float = 1.0, **_: float
) -> np.ndarray:
    """Per sample, each participant weighted by its top softmax probability: participants
    that are sure about a sample count more for it."""
    w = _softmax(scores / temperature).max(axis=2)  # (participants, samples)
    w = w / w.sum(axis=0, keepdims=True)
    return (w[..., None] * scores).sum(axis=0)


def era(
    scores: np.ndarray,
    weights: np.ndarray | None = None,
    temperature: float = 1.0,
    era_temperature: float = 0.1,
    **_: float,
) -> np.ndarray:
    """DS-FL's entropy reduction aggregation (Itahara et al., 2020): average the
    temperature-softened probabilities, then sharpen with softmax(average / era_temperature).
    Returned as log-probabilities, so a digest loss on logits targets that distribution."""
    averaged = _softmax(scores / temperature).mean(axis=0)
    return np.log(_softmax(averaged / era_temperature) + 1e-12)


def median(scores: np.ndarray, weights: np.ndarray | None = None, **_: float) -> np.ndarray:
    """Coordinate-wise median: robust to a minority of arbitrary scores."""
    return np.median(scores, axis=0)


def trimmed_mean(
    scores: np.ndarray, weights: np.ndarray | None = None, trim: float = 0.2, **_: float
) -> np.ndarray:
    """Coordinate-wise mean after dropping the `trim` fraction of highest and lowest values."""
    k = int(np.floor(trim * scores.shape[0]))
    if 2 * k >= scores.shape[0]:
        k = (scores.shape[0] - 1) // 2
    ordered = np.sort(scores, axis=0)
    return ordered[k : scores.shape[0] - k].mean(axis=0)


AGGREGATORS: dict[str, Callable[..., np.ndarray]] = {
    "mean": mean,
    "weighted": weighted,
    "confidence": confidence,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "era": era,
}
for _name, _function in AGGREGATORS.items():
    CONSENSUS.add_builtin(_name, _function)


def aggregator(
    method: str, code: Code | None = None, function: Callable | None = None
) -> tuple[Callable, dict]:
    """(function, its keyword arguments from the spec) for `method`: a built-in name, a
    registered one (`function`, carried from the driver), or a module/file spec."""
    if method in AGGREGATORS:
        return AGGREGATORS[method], {}
    if function is not None:
        return function, parse_spec(method).kwargs
    try:
        return CONSENSUS.resolve(method, code)
    except ConfigError as exc:
        raise ConsensusError(str(exc)) from None


def aggregate(
    scores: Sequence[np.ndarray],
    method: str = "mean",
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    code: Code | None = None,
    function: Callable | None = None,
    **options: float,
) -> np.ndarray:
    """Check the participants' scores and combine them with `method`; `options` are the
    built-ins' own (temperature, era_temperature, trim). A user's function gets the spec's
    `?key=value` options instead, and its answer is checked like the scores."""
    if method not in AGGREGATORS and function is None and ":" not in method and CONSENSUS.get(method) is None:
        raise ConsensusError(f"Unknown consensus '{method}'; known: {', '.join(CONSENSUS.names())}.")
    combine, user_options = aggregator(method, code, function)
    if len(scores) == 0:
        raise ConsensusError("No scores to aggregate: no participant answered.")
    names = list(names) if names is not None else [f"participant {i}" for i in range(len(scores))]
    shape = np.shape(scores[0])
    for name, s in zip(names, scores):
        if np.shape(s) != shape:
            raise ConsensusError(f"{name} sent scores of shape {np.shape(s)}, others {shape}.")
        if not np.all(np.isfinite(s)):
            raise ConsensusError(
                f"{name} sent NaN or infinite scores; its training diverged (try a lower train.lr)."
            )
    stacked = np.stack([np.asarray(s, dtype=np.float32) for s in scores])
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    if method in AGGREGATORS:
        return np.asarray(combine(stacked, w, **options), dtype=np.float32)
    try:
        answer = combine(stacked, w, **user_options)
    except Exception as exc:
        raise ConsensusError(
            f"consensus '{method}' raised {type(exc).__name__}: {exc}{raised_at(exc)}"
        ) from None
    if not isinstance(answer, np.ndarray | list | tuple) and not hasattr(answer, "__array__"):
        raise ConsensusError(
            f"consensus '{method}' returned a {type(answer).__name__}; it must return (samples, classes) = "
            f"{stacked.shape[1:]} scores, an array, for scores of shape {stacked.shape}."
        )
    try:
        out = np.asarray(answer, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ConsensusError(
            f"consensus '{method}' returned {type(answer).__name__} values that are not numbers ({exc}); "
            f"it must return (samples, classes) = {stacked.shape[1:]} scores."
        ) from None
    if out.shape != stacked.shape[1:]:
        raise ConsensusError(
            f"consensus '{method}' returned shape {out.shape}; it must return (samples, classes) = "
            f"{stacked.shape[1:]} for scores of shape {stacked.shape}."
        )
    if not np.all(np.isfinite(out)):
        raise ConsensusError(f"consensus '{method}' returned NaN or infinite values.")
    return out


def form_consensus(payloads: Sequence, names: Sequence[str], plan: ConsensusPlan) -> np.ndarray:
    """What both backends run: decode what participants sent, aggregate it as `plan` says
    (method, weights, options), and cast it for the trip back (float16 travels as float16)."""
    from fedmd_ray.sharing import decode

    consensus = aggregate(
        [decode(p) for p in payloads],
        plan.method,
        plan.weights,
        names,
        plan.code,
        plan.function,
        **plan.options,
    )
    return consensus.astype(plan.dtype)


def check_consensus(plan: ConsensusPlan, participants: int, classes: int) -> None:
    """Form a consensus of `plan` from made-up scores before any work: a user's function
    that fails, or returns something other than finite (samples, classes) scores, is
    refused now, not after transfer learning. Built-ins need no check."""
    if plan.method in AGGREGATORS:
        return
    scores = np.random.default_rng(0).normal(size=(participants, 4, classes)).astype(np.float32)
    try:
        form_consensus(list(scores), [f"participant {i}" for i in range(participants)], plan)
    except ConsensusError as exc:
        raise ConsensusError(f"{exc} (checked on made-up scores before any work)") from None
