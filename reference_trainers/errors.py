"""The errors the reference trainers raise for bad input; the CLI turns each into a message and exit code 2."""

from __future__ import annotations

__all__ = ["CheckpointError", "DataError", "OutputError", "TrainerError", "TrainingDiverged"]


class TrainerError(Exception):
    """Base class: a problem with the user's input (data, checkpoint, options), not a bug."""


class DataError(TrainerError):
    """A missing data root, an unreadable or corrupt image, an inconsistent data set."""


class CheckpointError(TrainerError):
    """A checkpoint that is unreadable, unsafe (arbitrary pickle), or written for another model or run."""


class TrainingDiverged(TrainerError):
    """The training loss became NaN or infinite (a learning rate too high, bad data); no checkpoint of
    the diverged weights is written, the last finite one is kept."""


class OutputError(TrainerError, OSError):
    """An output file that cannot be written (a full disk, a read-only or missing directory); also an ``OSError``."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return str(self.strerror) if self.strerror else super().__str__()
