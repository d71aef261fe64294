"""Ray Tune: one trial is one FedMD simulation.

The trial's placement group reserves the whole simulation (bundle 0 for the trial's own
process, one bundle per participant actor), so Tune never starts a trial the cluster cannot
hold, and the participant actors land in the trial's bundles. Each round reports the mean
accuracy and the gain over the lower bound, so schedulers such as ASHA stop weak trials early.

A search file (JSON or TOML):

    {"preset": "smoke",                       # or "config": {...} / "config_file": "run.json"
     "set": {"train.rounds": 4},              # fixed overrides
     "search": {"train.public_subset_size": {"choice": [500, 1000, 2000]},
                "train.lr": {"loguniform": [1e-4, 1e-2]},
                "train.digest_loss": {"grid": ["mae", "kl"]}},
     "num_samples": 2, "scheduler": "asha", "metric": "mean_accuracy"}

Domains: choice, grid, uniform, loguniform, randint (Tune's own).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmd_ray.backends.resources import even_share, init_ray, shares, uses_gpus
from fedmd_ray.backends.warm import release as release_kept_actors
from fedmd_ray.checks import absolute_value, from_dict, with_absolute_values
from fedmd_ray.config import Config, ConfigError, load_file, merge, parse_overrides
from fedmd_ray.data import default_data_dir
from fedmd_ray.presets import get_preset
from fedmd_ray.report import SummaryRow
from fedmd_ray.storage import Storage

DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")
TRIAL_CPU = 0.5
"""CPU of a trial's own process: it only coordinates, the participants compute."""
REPORTED = ("round", "mean_accuracy", "mean_gain", "min_gain", "lower_bound")


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    return parse_overrides([f"{k}={json.dumps(v)}" for k, v in dotted.items()])


def trial_resources(config: Config, cluster: dict[str, float] | None = None):
    """A PlacementGroupFactory sized from `config`: the trial, then one bundle per actor.
    Without resources.num_cpus, each actor gets an even share of `cluster`'s CPUs after the
    trial's own (trials then run one at a time), or 1 CPU when no cluster is given. On GPUs
    the GPU does the work: an actor then takes at most 1 CPU, so trials share the machine
    (on one H100 with 16 CPUs, two 4-participant trials at 0.1 GPU ran one at a time, the
    CPUs all reserved and 0.4 of the GPU in use)."""
    from ray.tune import PlacementGroupFactory

    r = config.resources
    actors = min(r.actors or config.num_participants, config.num_participants)
    cpus = r.num_cpus
    if cpus is None:
        cpus = 1.0 if cluster is None else even_share([cluster.get("CPU", 0) - TRIAL_CPU], actors)
        if uses_gpus(config):
            cpus = min(cpus, 1.0)
    if r.per_model and not r.actors:
        each = shares(config, cpus)
    else:
        each = [(cpus, r.num_gpus)] * actors
    bundles = [{"CPU": c, **({"GPU": g} if g else {})} for c, g in each]
    return PlacementGroupFactory([{"CPU": TRIAL_CPU}] + bundles, strategy=r.placement or "PACK")


def _check_fits(bundles: list[dict[str, float]], cluster: dict[str, float]) -> None:
    """Refuse a trial larger than the cluster: Tune would otherwise wait for it forever."""
    for kind in ("CPU", "GPU"):
        need, have = sum(b.get(kind, 0) for b in bundles), float(cluster.get(kind, 0))
        if need > have + 1e-9:
            actors = len(bundles) - 1
            fit = math.floor((have - bundles[0].get(kind, 0)) / actors * 100) / 100
            raise ConfigError(
                f"One trial reserves {need:g} {kind}s ({bundles[0].get(kind, 0):g} for the trial, "
                f"{bundles[1].get(kind, 0):g} for each of {actors} actors); the Ray cluster has {have:g}. "
                f"Set resources.num_{kind.lower()}s to {max(fit, 0):g} or less, use resources.actors for a pool, "
                "or add nodes."
            )


def summarise(summary: list[SummaryRow]) -> dict[str, float]:
    """The numbers a trial reports after a round."""
    lower = [r.lower_bound for r in summary]
    final = [r.fedmd_final for r in summary]
    gains = [r.gain for r in summary]
    return {
        "mean_accuracy": sum(final) / len(final),
        "mean_gain": sum(gains) / len(gains),
        "min_gain": min(gains),
        "lower_bound": sum(lower) / len(lower),
    }


def trainable(params: dict[str, Any], base: dict[str, Any]) -> None:
    """The Tune function trainable: `base` config values with the trial's `params` (dotted
    keys) on top; reports after every round."""
    from ray import tune

    from fedmd_ray.fedmd import run

    config = from_dict(merge(base, _nest(params)))
    trial_dir = tune.get_context().get_trial_dir()
    out = Path(trial_dir) / "fedmd" if trial_dir else None
    run(
        config,
        out,
        progress=None,
        on_round=lambda round_, summary: tune.report({"round": round_, **summarise(summary)}),
    )


def _absolute_domain(key: str, domain: Any) -> Any:
    """A search key's domain with the paths of its values made absolute where the search
    starts: each Tune trial runs in a working directory of its own, where relative paths
    name nothing."""
    if isinstance(domain, dict) and len(domain) == 1 and next(iter(domain)) in ("choice", "grid"):
        kind, values = next(iter(domain.items()))
        if isinstance(values, list):
            return {kind: [absolute_value(key, v) for v in values]}
    return absolute_value(key, domain)


def _domain(key: str, spec: Any):
    from ray import tune

    if not isinstance(spec, dict):
        return spec, spec  # a fixed value
    if len(spec) != 1 or next(iter(spec)) not in DOMAINS:
        raise ConfigError(
            f"Search key '{key}': give one domain, e.g. {{\"choice\": [1, 2]}}; known: {', '.join(DOMAINS)}."
        )
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"Search key '{key}': '{kind}' needs a non-empty list of values.")
        return (tune.choice(args) if kind == "choice" else tune.grid_search(args)), args[0]
    if not (isinstance(args, list) and len(args) == 2 and args[0] < args[1]):
        raise ConfigError(f"Search key '{key}': '{kind}' needs [low, high] with low < high.")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"Search key '{key}': loguniform needs low > 0.")
    domain = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind]
    return domain(*args), args[0]


def load_search(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], Config]:
    """(base values, Tune param space, a sample Config) from a search file's contents; every
    searched key is checked against the config before any trial starts."""
    known = {
        "preset",
        "config",
        "config_file",
        "set",
        "search",
        "num_samples",
        "scheduler",
        "metric",
        "max_concurrent_trials",
    }
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"Unknown search-file keys {unknown}; known: {', '.join(sorted(known))}.")
    for key in ("num_samples", "max_concurrent_trials"):
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            flag = " (--samples)" if key == "num_samples" else ""
            raise ConfigError(f"'{key}'{flag} is {value!r}; it must be a whole number of at least 1.")
    base: dict[str, Any] = get_preset(spec["preset"]) if spec.get("preset") else {}
    if spec.get("config_file"):
        base = merge(base, load_file(spec["config_file"]))
    base = merge(base, spec.get("config", {}))
    base = with_absolute_values(merge(base, _nest(spec.get("set", {}))))
    # The datasets' folder too, given or by default (FEDMD_DATA_DIR, else ./data): a trial's
    # working directory has no ./data.
    data_dir = base.get("data", {}).get("data_dir") or default_data_dir()
    base.setdefault("data", {})["data_dir"] = str(Path(data_dir).expanduser().resolve())
    if not spec.get("search"):
        raise ConfigError("The search file has no 'search' section: name at least one key to vary.")
    domains = {key: _absolute_domain(key, domain) for key, domain in spec["search"].items()}
    space, sample = {}, {}
    for key, domain in domains.items():
        space[key], sample[key] = _domain(key, domain)
    try:
        config = from_dict(merge(base, _nest(sample)))  # unknown or invalid keys fail here, named
    except ConfigError as exc:
        listed = [key for key, domain in domains.items() if isinstance(domain, list)]
        if not listed:
            raise
        raise ConfigError(
            f"{exc} A search key's list is one fixed value; to draw from it, write "
            f'{{"choice": [...]}} or {{"grid": [...]}} (search keys given a list: {", ".join(listed)}).'
        ) from None
    # Every value a trial may draw, not only the first: a bad one would otherwise fail its
    # trial minutes into the search.
    for key, domain in domains.items():
        for value in _extremes(domain):
            try:
                from_dict(merge(base, _nest({**sample, key: value})))
            except ConfigError as exc:
                raise ConfigError(f"Search key '{key}', value {value!r}: {exc}") from None
    return base, space, config


def _extremes(domain: Any) -> list[Any]:
    """The values of a domain that stand for all it may draw: each of a choice or grid, both
    ends of a range (randint's high is excluded)."""
    if not isinstance(domain, dict):
        return [domain]
    kind, args = next(iter(domain.items()))
    if kind in ("choice", "grid"):
        return list(args)
    return [args[0], args[1] - 1] if kind == "randint" else list(args)


def search(
    spec: dict[str, Any],
    out_dir: str | Path,
    verbose: int = 1,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run the search in `spec`; write results.parquet and results.md into `out_dir`; return
    one row per trial (its parameters, last round, metrics, error), best first."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    try:
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    except ImportError as exc:
        # Ray Tune's own dependencies (pydantic, pandas, ...) come with Ray's `tune` extra.
        raise ConfigError(
            f"Ray Tune cannot be imported here ({exc}). Install it with: pip install 'ray[tune]' "
            "(the README's install command includes it)."
        ) from None

    base, space, sample = load_search(spec)
    metric = spec.get("metric", "mean_accuracy")
    if metric not in REPORTED[1:]:
        raise ConfigError(f"'metric' is '{metric}'; trials report {', '.join(REPORTED[1:])}.")
    scheduler_name = spec.get("scheduler", "asha")
    if scheduler_name == "asha":
        rounds = max(1, sample.train.rounds)
        scheduler = ASHAScheduler(time_attr="round", max_t=rounds, grace_period=max(1, math.ceil(rounds / 4)))
    elif scheduler_name == "fifo":
        scheduler = FIFOScheduler()
    else:
        raise ConfigError(f"'scheduler' is '{scheduler_name}'; use asha or fifo.")

    Storage(out_dir).check_writable()  # before Ray starts: a bad --out is one line, not a traceback
    init_ray(sample.resources.address)
    release_kept_actors()  # trials need every CPU and GPU a kept actor would hold
    resources = trial_resources(sample, ray.cluster_resources())
    _check_fits(resources.bundles, ray.cluster_resources())
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, base=base), resources),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode="max",
            num_samples=spec.get("num_samples") or 1,
            scheduler=scheduler,
            max_concurrent_trials=spec.get("max_concurrent_trials"),
        ),
        run_config=tune.RunConfig(name="trials", storage_path=str(out), verbose=verbose),
    )
    grid = tuner.fit()
    rows = []
    for result in grid:
        params = {k: result.config.get(k) for k in space}
        last = result.metrics or {}
        row = {
            **{f"param:{k}": json.dumps(v) for k, v in params.items()},
            **{k: last.get(k) for k in REPORTED},
            "error": None if result.error is None else trial_error(result.error, result.path),
            "path": result.path,
        }
        rows.append(row)
    rows.sort(key=lambda r: -(r.get(metric) if r.get(metric) is not None else -math.inf))
    pq.write_table(pa.Table.from_pylist(rows), out / "results.parquet")
    table = render(rows, list(space), metric)
    (out / "results.md").write_text(table)
    progress(table)
    progress(f"results in {out}/ (results.parquet, results.md, trials/)")
    return rows


def trial_error(error: BaseException, trial_path: str) -> str:
    """A failed trial's error in one line: the error's own words, without the module path
    Ray prefixes, and with its traceback file where the trial's folder was stored (the run
    named the working copy Ray deletes when it ends)."""
    text = str(error).strip().splitlines()[-1]
    text = re.sub(r"^(?:[A-Za-z_][\w]*\.)+(?=[A-Za-z_]\w*: )", "", text)
    kept = Path(trial_path) / "fedmd" / "error.txt"
    text = re.sub(r" \(its traceback: [^()]*\)$", f" (its traceback: {kept})" if kept.is_file() else "", text)
    return text[:500]


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render(rows: list[dict], keys: list[str], metric: str) -> str:
    head = "| " + " | ".join([*keys, "rounds", "mean accuracy", "mean gain", "error"]) + " |"
    lines = [f"# FedMD search (best {metric} first)", "", head, "|" + "---|" * (len(keys) + 4)]
    for r in rows:
        cells = [_show(json.loads(r[f"param:{k}"])) for k in keys]
        acc, gain = r.get("mean_accuracy"), r.get("mean_gain")
        cells += [
            str(r.get("round") or "-"),
            f"{acc:.1%}" if acc is not None else "-",
            f"{100 * gain:+.1f} pts" if gain is not None else "-",
            r.get("error") or "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
