"""The phases of a FedMD run, each with one name and what the rest of the code needs to know
about it. The names are what metrics.parquet's `phase` column, progress events and fault
specs say; a phase compares equal to its name (`Phase.DIGEST == "digest"`)."""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    SETUP = "setup"
    RESUME = "resume"
    TRANSFER = "transfer"
    UPPER_BOUND = "upper_bound"
    COMMUNICATE = "communicate"
    AGGREGATE = "aggregate"
    DIGEST = "digest"
    REVISIT = "revisit"
    EVALUATE = "evaluate"
    CHECKPOINT = "checkpoint"

    @property
    def method(self) -> str | None:
        """The participant method that runs this phase (None: nobody's, the consensus is
        formed beside the participants)."""
        return _METHODS.get(self, self.value)

    @property
    def mutating(self) -> bool:
        """Whether it changes a participant's state: a restart replays these calls, and a
        pool keeps the participant's new state after them. Scores, evaluation and saving
        read the model and leave it as it was."""
        return self in _MUTATING


_METHODS = {Phase.SETUP: "describe", Phase.RESUME: "load", Phase.CHECKPOINT: "save", Phase.AGGREGATE: None}
_MUTATING = frozenset({Phase.TRANSFER, Phase.UPPER_BOUND, Phase.DIGEST, Phase.REVISIT, Phase.RESUME})

ROUND_PHASES = (Phase.COMMUNICATE, Phase.AGGREGATE, Phase.DIGEST, Phase.REVISIT, Phase.EVALUATE)
"""A collaboration round, in the paper's order."""

FAULT_PHASES = (Phase.TRANSFER, Phase.COMMUNICATE, Phase.DIGEST, Phase.REVISIT, Phase.EVALUATE)
"""Where a simulated fault (config `faults`) may fire."""
