"""FedMD (Li & Wang, 2019): transfer learning, then rounds of communicate -> aggregate ->
digest -> revisit -> evaluate, with the lower and upper bounds it is measured against.

This module is the algorithm; `backends` decides where participants run (protocol.py is
all it knows of them), `plans` what each round works on, `results` what is written.
Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmd_ray import checkpoint, privacy, running
from fedmd_ray.backends import make_backend
from fedmd_ray.backends.resources import local_cpus, participant_threads
from fedmd_ray.checks import from_dict, with_absolute_paths
from fedmd_ray.config import Config, ConfigError, gpu_share
from fedmd_ray.consensus import AGGREGATORS, check_consensus
from fedmd_ray.errors import StateLost, StorageError
from fedmd_ray.faults import parse_fault
from fedmd_ray.phases import Phase
from fedmd_ray.plans import RoundPlans
from fedmd_ray.plugins import CONSENSUS, DIGEST_LOSSES, MODELS, carried
from fedmd_ray.protocol import Backend, ConsensusPlan, Scores
from fedmd_ray.report import SummaryRow
from fedmd_ray.results import Recorder
from fedmd_ray.spec import ParticipantSpec
from fedmd_ray.storage import Storage
from fedmd_ray.tasks import Task, build_task, participant_names
from fedmd_ray.tracking import check_trackers


@dataclass
class RunResult:
    out_dir: str | None
    """Where the results are: a local folder's absolute path or a URI (None: not written)."""
    summary: list[SummaryRow]
    """One row per participant: lower bound, final, upper bound, gain."""
    metrics: object
    """The metrics as a pyarrow Table (one row per round x participant x phase)."""

    @property
    def mean_gain(self) -> float:
        return float(np.mean([r.gain for r in self.summary]))


def run(
    config: Config | Mapping[str, Any],
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = print,
    task: Task | None = None,
    on_round: Callable[[int, list[SummaryRow]], None] | None = None,
    resume: bool = False,
    report: Callable[[dict], None] | None = None,
) -> RunResult:
    """Run one FedMD simulation of `config` (a Config, or a dict of config values over the
    defaults); write results to `out_dir` as it goes (when given). With
    `resume`, continue the run in `out_dir` from its last checkpoint (one that had finished
    is not run again: its results are written anew from its metrics; one stopped before its
    first checkpoint runs again from its start). `progress` takes
    summary lines; `report` takes progress events as they happen (see `progress.py`).
    `on_round(round, summary)` is called after each round with the per-participant summary
    so far. `out_dir` is a local folder or a URI (s3://, gs://, ...: storage.py); a new run
    there replaces an earlier one's results (results.OUTPUTS), as it starts. A run
    refused before any work (bad data, too few resources, a model, consensus or digest loss
    that cannot work) leaves no results folder behind."""
    # Built in Python or read from a file, a config is coerced and checked the same way.
    if not isinstance(config, Config | Mapping):
        raise ConfigError(
            f"run() takes a Config or a dict of config values, not {type(config).__name__}: e.g. "
            'run(from_dict(get_preset("smoke"))) or run({"train": {"rounds": 2}}).'
        )
    for what, fn in (("progress", progress), ("report", report), ("on_round", on_round)):
        if fn is not None and not callable(fn):
            raise ConfigError(
                f"run()'s {what} must be a function (e.g. progress=print) or None, not {type(fn).__name__}."
            )
    values = config.to_dict() if isinstance(config, Config) else dict(config)
    config = with_absolute_paths(from_dict(values))
    if resume and out_dir is None:
        raise ConfigError("Resuming needs the run's output directory (--resume DIR).")
    storage = Storage(out_dir) if out_dir is not None else None
    say = progress or (lambda _line: None)
    losses = 0
    while True:
        try:
            return _run(config, storage, say, task, on_round, resume, report)
        except StateLost as exc:
            # A node went, and state only it held with it: every call is seeded, so the
            # rounds since the last checkpoint (never on a node's own disk) compute again
            # exactly. Counted like actor restarts.
            losses += 1
            if storage is None or not checkpoint.exists(storage):
                raise StateLost(
                    exc.participant,
                    exc.what,
                    "a run without a results folder (or with checkpoint_every=0) has no checkpoint "
                    "to continue from: give it one to survive a lost node",
                ) from None
            if losses > config.resources.max_restarts:
                raise StateLost(
                    exc.participant,
                    exc.what,
                    f"nodes lost {losses} times (resources.max_restarts={config.resources.max_restarts}); "
                    f"continue with --resume {storage}",
                ) from None
            say(f"{exc}: continuing from the last checkpoint in {storage}")
            resume = True


def _run(
    config: Config,
    storage: Storage | None,
    say: Callable[[str], None],
    task: Task | None,
    on_round: Callable[[int, list[SummaryRow]], None] | None,
    resume: bool,
    report: Callable[[dict], None] | None,
) -> RunResult:
    if resume and not checkpoint.exists(storage) and storage.exists("config.json"):
        # Stopped before its first checkpoint (or run with checkpoint_every=0): nothing to
        # continue from, and running it again from the start gives the same numbers.
        say(f"no checkpoint in {storage} to continue from: the run runs again from its start")
        resume = False
    if storage is not None and not resume:
        storage.check_writable()
    # A resume that cannot work says so before any participant starts.
    saved = checkpoint.saved(storage) if storage is not None and resume else None
    if saved is not None and saved.round > config.train.rounds:
        raise ConfigError(
            f"The run in {storage} has already run {saved.round} rounds; train.rounds="
            f"{config.train.rounds} would end it before its last checkpoint. Resume with "
            f"--set train.rounds=N for N of at least {saved.round}, or start a new run."
        )
    if saved is None or saved.round < config.train.rounds:  # a finished run tracks nothing
        check_trackers(config.log, storage)
    t = config.train
    task = task or build_task(config)
    specs = participant_specs(config, task)
    names = [s.name for s in specs]
    plans = RoundPlans(
        config.seed,
        t.rounds,
        len(specs),
        task.public_train.y,
        t.public_subset_size,
        t.stratified_subset,
        t.participation,
    )
    consensus_of = consensus_plan(config, task)
    check_consensus(consensus_of, len(specs), task.num_classes)
    if saved is not None:
        # Settings that change the numbers are refused before any participant starts; only
        # the threads each participant gets need the backend, and are checked once it is up.
        checkpoint.check(storage, saved, checkpoint.identity(config, saved.threads), names)
        if saved.round == t.rounds:
            return _finished(config, storage, task, saved, plans, say)
    saving = storage is not None and config.checkpoint_every > 0
    if storage is not None:
        running.check_free(storage)
    say(f"starting {len(specs)} participants on the '{config.resources.backend}' backend ...")
    _warn_oversubscribed(config, say)
    backend = make_backend(config, task, specs, report)
    recorder: Recorder | None = None
    marked = False
    try:
        described = backend.describe()
        # Marked as the backend is up, before the first write: a run that started meanwhile
        # into the same folder is refused here, before it replaces anything of this one's.
        marked = storage is not None and running.mark(storage)
        recorder = Recorder(storage, config, task, say, replace=saved is None)
        recorder.participants(described, backend.placement)
        say(
            f"{len(specs)} participants ready on the '{backend.name}' backend; "
            f"{len(task.public_train)} public samples, {task.num_classes} classes"
        )
        identity = checkpoint.identity(config, backend.threads)
        if saved is not None:
            checkpoint.check(storage, saved, identity, names)
            backend.restore(storage, saved.folder, saved.entries)
            done = saved.round
            recorder.resume(done)
            recorder.privacy_spent(_epsilons(config, plans.releases(done)))
            backend.end_round(done)
            say(f"resumed after round {done} from {saved.folder}")
        else:
            done = 0
            # Transfer learning: public data, then private data. This is the lower bound.
            with recorder.timer() as clock:
                transferred = backend.transfer()
            recorder.phase(0, Phase.TRANSFER, transferred, clock.seconds)
            # The upper bound: each architecture trained on all private data pooled.
            if t.upper_bound:
                pooled = task.pooled_private()
                with recorder.timer() as clock:
                    bounds = backend.upper_bound(pooled.x, pooled.y)
                recorder.phase(0, Phase.UPPER_BOUND, bounds, clock.seconds)
            _end_round(backend, recorder, config, 0, (), storage if saving else None, identity)

        # Collaboration rounds.
        releases = plans.releases(done)  # scores each participant has sent: its privacy spent
        measured = Measurements(len(specs), t.evaluate_every, t.rounds)
        for round_ in range(done + 1, t.rounds + 1):
            plan = plans[round_]
            # 1. Communicate: the chosen participants' scores on the round's public subset.
            scores = backend.communicate(plan)
            releases[plan.chosen] += 1  # late ones too: their scores left them, used or not
            recorder.scores(scores, _epsilons(config, releases))
            # 2. Aggregate: the scores in time become the consensus.
            with recorder.timer() as clock:
                consensus = backend.aggregate(scores, consensus_of.among(scores.answered))
            recorder.timing(round_, Phase.AGGREGATE, clock.seconds)
            # 3. Digest (towards the consensus), 4. revisit (private data), 5. evaluate.
            evaluate = measured.due(scores)
            updates = backend.update(scores, consensus, evaluate, plans.after(plan))
            recorder.phase(round_, Phase.DIGEST, updates.digest, updates.walls[Phase.DIGEST], scores.answered)
            recorder.phase(
                round_, Phase.REVISIT, updates.revisit, updates.walls[Phase.REVISIT], scores.answered
            )
            recorder.safeguard(round_, scores.answered, updates.revisit)
            if measured.measuring(round_):
                present, rows = measured.rows(scores, evaluate, updates.evaluate)
                recorder.phase(round_, Phase.EVALUATE, rows, updates.walls[Phase.EVALUATE], present)
            _end_round(
                backend, recorder, config, round_, scores.late, storage if saving else None, identity, report
            )
            if on_round is not None:
                on_round(round_, recorder.summary())
        recorder.finish(complete=True)
    except BaseException as exc:
        if recorder is not None:
            try:
                recorder.failed(exc)
                recorder.finish(complete=False)
            except StorageError:
                pass  # the place is full or gone: what it holds stays; the run's error is said
        raise
    finally:
        backend.shutdown()
        if marked:
            running.unmark(storage)
    return RunResult(str(storage) if storage else None, recorder.summary(), recorder.table())


def _finished(
    config: Config,
    storage: Storage,
    task: Task,
    saved: checkpoint.Saved,
    plans: RoundPlans,
    say: Callable[[str], None],
) -> RunResult:
    """Resuming a run whose last checkpoint is its last round: nothing is computed and no
    participant starts; its summary, figure and result come from its metrics again (whole
    even if the run was stopped while writing them)."""
    recorder = Recorder(storage, config, task, say, track=False)
    recorder.reopen()
    recorder.resume(saved.round)
    recorder.privacy_spent(_epsilons(config, plans.releases(saved.round)))
    say(
        f"the run in {storage} had already finished its {saved.round} rounds; nothing to run "
        "(--set train.rounds=N resumes it for more)"
    )
    recorder.finish(complete=True)
    return RunResult(str(storage), recorder.summary(), recorder.table())


def _end_round(
    backend: Backend,
    recorder: Recorder,
    config: Config,
    round_: int,
    late: list[int] | tuple,
    saving: Storage | None,
    identity: dict,
    report: Callable[[dict], None] | None = None,
) -> None:
    """A round's end: what a restart resumes from (late participants, still computing,
    skip it), what happened to the participants, the round on disk, and every
    checkpoint_every rounds the files a --resume starts from, written after the round's
    metrics."""
    rounds = config.train.rounds
    with recorder.timer() as snapshot:
        events = backend.end_round(round_, busy=late)
    recorder.events_of(round_, events)
    if round_ > 0:
        if report is not None:
            report({"kind": "round", "round": round_, "rounds": rounds})
        recorder.end_round(round_, rounds)
    recorder.flush()
    with recorder.timer() as clock:
        if saving is not None and (round_ == 0 or round_ % config.checkpoint_every == 0 or round_ == rounds):
            folder = checkpoint.round_folder(round_)
            checkpoint.write(saving, round_, identity, backend.save(saving, folder))
    if round_ > 0:
        recorder.timing(round_, Phase.CHECKPOINT, snapshot.seconds + clock.seconds)
        recorder.flush()


class Measurements:
    """Test accuracy every train.evaluate_every rounds (and after the last). Only models
    that changed since they were last measured are evaluated again; the others' rows repeat
    their last result, which is exact (evaluation is deterministic), so with
    train.participation=0.01 a round costs the sampled participants, not all N."""

    def __init__(self, participants: int, every: int, rounds: int):
        self.every, self.rounds = every, rounds
        self.everyone = range(participants)
        self.last: dict[int, dict] = {}
        self.changed: set[int] = set(self.everyone)  # the never measured are in it too

    def measuring(self, round_: int) -> bool:
        return round_ % self.every == 0 or round_ == self.rounds

    def due(self, scores: Scores) -> list[int]:
        """Who is evaluated this round: those present whose model changed."""
        self.changed.update(scores.answered)
        if not self.measuring(scores.plan.round):
            return []
        late = set(scores.late)
        return [i for i in self.everyone if i not in late and i in self.changed]

    def rows(self, scores: Scores, evaluated: list[int], results: list[dict]) -> tuple[list[int], list[dict]]:
        """(who is present, their evaluation rows): the fresh ones, and the others' last."""
        self.last.update(zip(evaluated, results))
        self.changed.difference_update(evaluated)
        ran, late = set(evaluated), set(scores.late)
        present = [i for i in self.everyone if i not in late]
        return present, [self.last[i] if i in ran else {**self.last[i], "seconds": 0.0} for i in present]


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
            device=participant_device(config, config.model_of(i)),
            torch_threads=config.resources.torch_threads,
            sharing=config.sharing,
            adversary=i in config.sharing.adversaries,
            faults=tuple(f for f in faults if f.participant == i),
            model_factory=carried(MODELS, config.model_of(i)),
            digest_function=carried(DIGEST_LOSSES, config.train.digest_loss),
            public_mean=task.public_mean,
            private_mean=task.private_mean,
        )
        for i, name in enumerate(participant_names(config))
    ]


def _warn_oversubscribed(config: Config, say: Callable[[str], None]) -> None:
    """The local backend runs each participant on the threads its share gives it, however
    few cores this machine has (so that it computes a Ray run's numbers): say so when that
    is more threads than cores."""
    if config.resources.backend != "local":
        return
    cores = local_cpus()
    threads = participant_threads(config, cores)
    if threads > cores:
        key = "torch_threads" if config.resources.torch_threads else "num_cpus"
        say(
            f"warning: each participant computes on {threads} torch threads (resources.{key}) and "
            f"this machine has {cores} cores: the local backend runs them as asked, slowly. A "
            f"smaller resources.{key} runs faster, with other numbers."
        )


def participant_device(config: Config, model: str) -> str:
    """resources.device for a participant of `model`: 'auto' means CUDA only with a GPU share.
    Ray (2.60 here) leaves an actor given no GPU every GPU of its node in sight (it no longer
    empties CUDA_VISIBLE_DEVICES), and the local backend always sees them: without this a
    run with num_gpus=0 on a GPU machine put every participant on GPU 0, unaccounted, and
    computed other numbers than the CPU run its config and checkpoint describe."""
    device = config.resources.device
    if device == "auto" and not gpu_share(config, model) > 0:
        return "cpu"
    return device


def consensus_plan(config: Config, task: Task) -> ConsensusPlan:
    """How the consensus is formed: the method, its weights and options, the return dtype."""
    t = config.train
    # A user's function gets the private data sizes too: weighing by them is a common idea.
    sized = t.consensus == "weighted" or t.consensus not in AGGREGATORS
    return ConsensusPlan(
        method=t.consensus,
        function=carried(CONSENSUS, t.consensus),
        weights=[float(len(p)) for p in task.private_parts] if sized else None,
        options={"temperature": t.temperature, "era_temperature": t.era_temperature, "trim": t.trim_fraction},
        dtype="float16" if config.sharing.payload == "float16" else "float32",
    )


def _epsilons(config: Config, releases: np.ndarray) -> list[float | None] | None:
    """Each participant's epsilon (at sharing.delta) after `releases` score releases; None
    when differential privacy is off, inf when scores are clipped but not noised."""
    sh = config.sharing
    if sh.clip is None:
        return None
    return [privacy.epsilon(sh.noise_multiplier, int(k), sh.delta, sh.accountant) for k in releases]
