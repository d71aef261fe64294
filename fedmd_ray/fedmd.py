"""FedMD (Li & Wang, 2019): transfer learning, then rounds of communicate -> aggregate ->
digest -> revisit -> evaluate, with the lower and upper bounds it is measured against.

This module is the algorithm; `backends` decides where participants run, `results` what is
written. Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmd_ray import checkpoint, privacy
from fedmd_ray.backends import make_backend
from fedmd_ray.config import Config, ConfigError, parse_fault, validate
from fedmd_ray.consensus import AGGREGATORS
from fedmd_ray.plugins import CONSENSUS, DIGEST_LOSSES, MODELS, carried
from fedmd_ray.results import Recorder
from fedmd_ray.spec import ParticipantSpec
from fedmd_ray.tasks import Task, build_task, participant_names


@dataclass
class RunResult:
    out_dir: Path | None
    summary: list[dict]
    """One row per participant: lower bound, final, upper bound, gain."""
    metrics: object
    """The metrics as a pyarrow Table (one row per round x participant x phase)."""

    @property
    def mean_gain(self) -> float:
        return float(np.mean([r["gain"] for r in self.summary]))


def participant_specs(config: Config, task: Task) -> list[ParticipantSpec]:
    faults = [parse_fault(f, config.num_participants) for f in config.faults]
    return [
        ParticipantSpec(
            index=i,
            name=name,
            model=config.model_of(i),
            seed=config.seed,
            num_classes=task.num_classes,
            image_shape=task.image_shape,
            train=config.train,
            device=config.resources.device,
            torch_threads=config.resources.torch_threads,
            sharing=config.sharing,
            adversary=i in config.sharing.adversaries,
            faults=tuple((phase, r, mode) for j, phase, r, mode in faults if j == i),
            model_factory=carried(MODELS, config.model_of(i)),
            digest_function=carried(DIGEST_LOSSES, config.train.digest_loss),
            public_mean=task.public_mean,
            private_mean=task.private_mean,
        )
        for i, name in enumerate(participant_names(config))
    ]


def consensus_plan(config: Config, task: Task) -> dict:
    """How the consensus is formed: the method, its weights and options, the return dtype."""
    t = config.train
    # A user's function gets the private data sizes too: weighing by them is a common idea.
    sized = t.consensus == "weighted" or t.consensus not in AGGREGATORS
    weights = [float(len(p)) for p in task.private_parts] if sized else None
    return {
        "method": t.consensus,
        "function": carried(CONSENSUS, t.consensus),
        "weights": weights,
        "options": {
            "temperature": t.temperature,
            "era_temperature": t.era_temperature,
            "trim": t.trim_fraction,
        },
        "dtype": "float16" if config.sharing.payload == "float16" else "float32",
    }


def privacy_spent(config: Config, releases: int) -> float | None:
    """Epsilon (at sharing.delta) of a participant that has released scores `releases`
    times; None when differential privacy is off, inf when scores are clipped but not noised."""
    sh = config.sharing
    if sh.clip is None:
        return None
    return privacy.epsilon(sh.noise_multiplier, releases, sh.delta, sh.accountant)


def public_subset(
    rng: np.random.Generator, labels: np.ndarray, subset_size: int, stratified: bool = True
) -> np.ndarray:
    """The round's fresh draw of public samples ('alignment data'), sorted for locality.
    Stratified (the authors' StratifiedShuffleSplit): each class gets its share of the
    subset, rounded by largest remainder so the sizes add up."""
    n = len(labels)
    size = min(subset_size, n)
    if not stratified or size == n:
        return np.sort(rng.choice(n, size=size, replace=False))
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = size * counts / n
    take = np.floor(quota).astype(np.int64)
    short = size - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    order = np.argsort(inverse, kind="stable")  # sample indices grouped by class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    chosen = [rng.choice(order[s : s + c], size=k, replace=False) for s, c, k in zip(starts, counts, take)]
    return np.sort(np.concatenate(chosen))


def sample_participants(seed: int, round_: int, n: int, fraction: float) -> list[int]:
    """Who takes part in round `round_`: everyone, or a seeded draw of round(fraction * n)."""
    if fraction >= 1:
        return list(range(n))
    k = max(1, round(fraction * n))
    rng = np.random.default_rng([seed, round_, 0x5A])
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False))


def _plan_for(plan: dict, answered: list[int]) -> dict:
    if plan.get("weights") is None:
        return plan
    return {**plan, "weights": [plan["weights"][i] for i in answered]}


def _save_checkpoint(backend, out_dir: Path, round_: int, config: Config) -> None:
    folder = checkpoint.round_dir(out_dir, round_)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint.write(out_dir, round_, config, backend.save(folder))


def run(
    config: Config,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = print,
    task: Task | None = None,
    on_round: Callable[[int, list[dict]], None] | None = None,
    resume: bool = False,
    report: Callable[[dict], None] | None = None,
) -> RunResult:
    """Run one FedMD simulation; write results to `out_dir` as it goes (when given). With
    `resume`, continue the run in `out_dir` from its last checkpoint. `progress` takes
    summary lines; `report` takes progress events as they happen (see `progress.py`).
    `on_round(round, summary)` is called after each round with the per-participant summary
    so far. A run refused before any work (bad data, too few resources, a model that cannot
    be built) leaves no results folder behind."""
    validate(config)
    if resume and out_dir is None:
        raise ConfigError("Resuming needs the run's output directory (--resume DIR).")
    say = progress or (lambda _msg: None)
    tell = report or (lambda _event: None)
    task = task or build_task(config)
    specs = participant_specs(config, task)
    names = [s.name for s in specs]
    t = config.train
    saving = out_dir is not None and config.checkpoint_every > 0
    recorder: Recorder | None = None

    def phase(kind: str | list[str], round_: int, who: list[int] | None = None) -> None:
        """A phase starts; `kind` may be several steps run together (see Progress)."""
        chosen = names if who is None else [names[i] for i in who]
        event = {"kind": "phase", "round": round_, "rounds": t.rounds, "participants": chosen}
        if isinstance(kind, list):
            event["steps"] = kind
            kind = " + ".join(kind)
        tell({**event, "phase": kind})

    phase("setup", 0)
    say(f"starting {len(specs)} participants on the '{config.resources.backend}' backend ...")
    backend = make_backend(config, task, specs, report)
    try:
        described = backend.describe()
        recorder = Recorder(out_dir, config, task, say)
        recorder.participants(described, getattr(backend, "placement", None))
        say(
            f"{len(specs)} participants ready on the '{backend.name}' backend; "
            f"{len(task.public_train)} public samples, {task.num_classes} classes"
        )
        first_round = 1
        if resume:
            done, folder, entries = checkpoint.read(Path(out_dir), config, names)
            phase("resume", done)
            backend.restore(folder, entries)
            recorder.resume(done)
            backend.end_round(done)
            first_round = done + 1
            say(f"resumed after round {done} from {folder}")
        else:
            # 1. Transfer learning: public data, then private data. This is the lower bound.
            phase("transfer", 0)
            with recorder.timer() as clock:
                transferred = backend.transfer()
            recorder.phase(0, "transfer", transferred, clock.seconds)

            # 3. Upper bound: each architecture trained on all private data pooled.
            if t.upper_bound:
                pooled = task.pooled_private()
                phase("upper_bound", 0)
                with recorder.timer() as clock:
                    bounds = backend.upper_bound(pooled.x, pooled.y)
                recorder.phase(0, "upper_bound", bounds, clock.seconds)
            backend.end_round(0)
            if saving:
                _save_checkpoint(backend, Path(out_dir), 0, config)

        # 2. Collaboration rounds.
        rng = np.random.default_rng(config.seed + 1_000_003)
        for _ in range(1, first_round):
            public_subset(rng, task.public_train.y, t.public_subset_size, t.stratified_subset)  # already made
        plan = consensus_plan(config, task)
        everyone = list(range(len(specs)))
        # Scores each participant has released so far: its privacy spent (privacy.py).
        releases = np.zeros(len(specs), dtype=np.int64)
        # Evaluation: only models that changed since they were last measured are run again;
        # the others' rows repeat their last result (exact: evaluation is deterministic), so
        # with train.participation=0.01 a round costs the sampled participants, not all N.
        last_eval: dict[int, dict] = {}
        changed: set[int] = set(everyone)
        for past in range(1, first_round):
            releases[sample_participants(config.seed, past, len(specs), t.participation)] += 1
        # The next round's communicate may run as the last of this round's steps (steps.py):
        # only where everyone is waited for, so that the round's answered are its chosen.
        res = config.resources
        ahead = backend.runs_ahead and res.quorum >= 1 and res.deadline_s is None
        upcoming: tuple | None = None  # (indices, chosen, logits' result or None, its wall seconds)

        def draw(round_: int) -> tuple[np.ndarray, list[int]]:
            """A round's public subset and participants, drawn in round order."""
            indices = public_subset(rng, task.public_train.y, t.public_subset_size, t.stratified_subset)
            return indices, sample_participants(config.seed, round_, len(specs), t.participation)

        for round_ in range(first_round, t.rounds + 1):
            if upcoming is None:
                (indices, chosen), early = draw(round_), None
            else:
                indices, chosen, early, communicate_wall = upcoming
            upcoming = None
            if early is None:
                phase("communicate", round_, chosen)
                with recorder.timer() as clock:
                    answered, late, scores = backend.logits(chosen, indices, round_)
                communicate_wall = clock.seconds
            else:
                answered, late, scores = early
            del early  # its score refs must go with `scores`, right after aggregation
            releases[chosen] += 1  # late ones too: their scores left them, used or not
            # The round's row carries the most-exposed participant's epsilon; the summary each one's.
            recorder.timing(
                round_, "communicate", communicate_wall, epsilon=privacy_spent(config, int(releases.max()))
            )
            if config.sharing.clip is not None:
                recorder.epsilons = {names[i]: privacy_spent(config, int(k)) for i, k in enumerate(releases)}
            recorder.note(round_, [names[i] for i in everyone if i not in chosen], "sat out")
            recorder.note(round_, [names[i] for i in late], "late")

            with recorder.timer() as clock:
                consensus = backend.aggregate(scores, [names[i] for i in answered], _plan_for(plan, answered))
            # Let the scores go before the round's training: at 10 000 participants on Ray they
            # are 128 MiB in the driver's own object store, and the next round makes as many.
            del scores
            recorder.timing(round_, "aggregate", clock.seconds)

            # Each participant digests, revisits, then is evaluated, needing nobody else's
            # step: a backend may start one participant's next step while others finish.
            changed.update(answered)
            evaluating = round_ % t.evaluate_every == 0 or round_ == t.rounds
            present = [i for i in everyone if i not in late]
            run_now = [i for i in present if i in changed]  # the never measured are in it too
            steps = [("digest", answered, (consensus, indices, round_)), ("revisit", answered, (round_,))]
            if evaluating:
                steps.append(("evaluate", run_now, (round_,)))
            next_ahead = ahead and round_ < t.rounds
            if next_ahead:
                indices_next, chosen_next = draw(round_ + 1)
                steps.append(("logits", chosen_next, (indices_next, round_ + 1)))
            results, walls = backend.steps(
                steps, lambda kinds, who, r=round_: phase(kinds, r, who), ahead=next_ahead
            )
            if next_ahead:
                upcoming = (indices_next, chosen_next, results.pop(), walls.pop())
            recorder.phase(round_, "digest", results[0], walls[0], answered)
            recorder.phase(round_, "revisit", results[1], walls[1], answered)
            if evaluating:
                last_eval.update(zip(run_now, results[2]))
                changed.difference_update(run_now)
                ran = set(run_now)
                evaluated = [last_eval[i] if i in ran else {**last_eval[i], "seconds": 0.0} for i in present]
                recorder.phase(round_, "evaluate", evaluated, walls[2], present)
            # Checkpoint: the states an actor restart resumes from, and every
            # checkpoint_every rounds the files a --resume starts from.
            with recorder.timer() as snapshot:
                backend.end_round(round_, busy=late)
            for event in backend.events:
                recorder.note(round_, [event["participant"]], event["note"], event["phase"])
            backend.events.clear()
            tell({"kind": "round", "round": round_, "rounds": t.rounds})
            recorder.end_round(round_, t.rounds)  # the round's metrics are on disk before its checkpoint
            with recorder.timer() as clock:
                if saving and (round_ % config.checkpoint_every == 0 or round_ == t.rounds):
                    _save_checkpoint(backend, Path(out_dir), round_, config)
            recorder.timing(round_, "checkpoint", snapshot.seconds + clock.seconds)
            recorder.flush()
            if on_round is not None:
                on_round(round_, recorder.summary())
        recorder.finish(complete=True)
    except BaseException:
        if recorder is not None:
            recorder.finish(complete=False)
        raise
    finally:
        backend.shutdown()
    return RunResult(recorder.out_dir, recorder.summary(), recorder.table())
