"""The errors fedmd_ray raises on purpose. Each message says what is wrong and how to fix it;
the CLI prints it without a traceback."""

from __future__ import annotations

import difflib
import sysconfig
import traceback
from collections.abc import Iterable
from pathlib import Path


class FedMDError(Exception):
    """Base of every error a user can act on."""


class ConfigError(FedMDError, ValueError):
    """A configuration key or value that cannot be used."""


class DatasetError(FedMDError, FileNotFoundError):
    """An unknown dataset, or one whose files are missing."""


class PartitionError(FedMDError, ValueError):
    """A partition the private data cannot fill."""


class ConsensusError(FedMDError, ValueError):
    """Scores that cannot be aggregated (shape mismatch, NaN or inf)."""


class ParticipantError(FedMDError, RuntimeError):
    """A participant raised or died; the run stops with its name and its error."""

    def __init__(self, participant: str, phase: str, message: str, trace: str | None = None):
        self.participant, self.phase = participant, phase
        self.trace = trace
        """Where its own code raised (the traceback), for the run folder's error.txt."""
        self.trace_file: str | None = None
        """Where `trace` was written, once it was."""
        if "CUDA out of memory" in message or "torch.OutOfMemoryError" in message:
            message += (
                " -- it ran out of GPU memory: each participant may use only its share of a GPU "
                "(resources.num_gpus); give it a larger share or lower the batch sizes."
            )
        super().__init__(f"Participant '{participant}' failed during {phase}: {message}")

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (its traceback: {self.trace_file})" if self.trace_file else text

    def __reduce__(self) -> tuple:
        # Pickled as it is (a Tune trial's error, an error crossing processes): the default
        # would call __init__ with the finished message alone, and fail.
        return _unpickled, (self.args[0], self.__dict__)


def _unpickled(text: str, state: dict) -> ParticipantError:
    error = ParticipantError.__new__(ParticipantError)
    Exception.__init__(error, text)
    error.__dict__.update(state)
    return error


class StateLost(FedMDError, RuntimeError):
    """A participant's state, or its scores, went with the node that held them in its object
    store (a worker node lost): a run with a checkpoint continues from it (fedmd.run)."""

    def __init__(self, participant: str, what: str, then: str = ""):
        self.participant, self.what, self.then = participant, what, then
        super().__init__(
            f"Participant '{participant}' lost {what} with the node that held it"
            + (f"; {then}" if then else "")
        )

    def __reduce__(self) -> tuple:
        return StateLost, (self.participant, self.what, self.then)


class StorageError(FedMDError, OSError):
    """Results or a checkpoint that could not be written (a full disk, a place that became
    read-only or unreachable): what was written before stays whole."""


class ResourceError(FedMDError, RuntimeError):
    """A request for more CPUs or GPUs than the Ray cluster has."""


class CheckpointError(FedMDError, RuntimeError):
    """A checkpoint that is missing, damaged, or from a different configuration."""


def did_you_mean(value: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """' Did you mean 'x'?' for the choice closest to `value`, or '' when none is close:
    the one suggestion every error about a misspelt name ends with."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=cutoff)
    return f" Did you mean '{close[0]}'?" if close else ""


class Failed:
    """A participant's call that raised, answered in place of its metrics so that the other
    participants of its pool bundle keep their answers. `error` is kept where it is ours (it
    says what is wrong and how to fix it); anything else travels as its type and message."""

    def __init__(self, exc: BaseException):
        self.error = exc if isinstance(exc, FedMDError) else None
        self.text = f"{type(exc).__name__}: {exc}"
        self.trace = format_trace(exc)


def raised_at(exc: BaseException) -> str:
    """' (at FILE, line N)': the last line of the user's own code that `exc` passed through
    (not fedmd_ray's, torch's or Python's), for a one-line error about that code; '' if none."""
    where = ""
    for frame, line in traceback.walk_tb(exc.__traceback__):
        name = frame.f_code.co_filename
        if not _library(name):
            where = f" (at {name}, line {line})"
    return where


def _library(filename: str) -> bool:
    path = Path(filename)
    if not path.is_absolute() or path.is_relative_to(_PACKAGE):
        return True  # '<string>', frozen modules, fedmd_ray itself
    return any(path.is_relative_to(root) for root in _INSTALLED)


_PACKAGE = Path(__file__).resolve().parent
_INSTALLED = [Path(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib")]


def format_trace(exc: BaseException) -> str:
    """`exc`'s traceback as Python prints it: where a participant's own code raised."""
    return "".join(traceback.format_exception(exc))
