"""jaxtl's own exception types.

Every failure a user can cause (a bad name, a bad file, bad data, a bad flag)
raises one of these with a one-line message that says what was wrong and what
to do. The command lines print that line and exit non-zero; a traceback is only
shown with ``--debug``.
"""

from __future__ import annotations


class JaxtlError(Exception):
    """Base class: a user-facing failure with an actionable one-line message."""


class UnknownModelError(JaxtlError, KeyError):
    """A backbone name the registry does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConversionError(JaxtlError):
    """A state dict that does not fit the backbone (missing/extra/mis-shaped keys)."""


class WeightsError(JaxtlError):
    """A weights file that cannot be read, is corrupt, unsafe or fails its hash."""


class WeightsNotFoundError(WeightsError):
    """Pretrained weights that are neither cached nor downloadable right now."""


class DataError(JaxtlError):
    """A dataset that cannot be used as given."""


class ConfigError(JaxtlError):
    """An invalid option or combination of options."""


class CheckpointError(JaxtlError):
    """A checkpoint or output folder that cannot be written or resumed."""


class TrainingError(JaxtlError):
    """A run that has to stop (non-finite loss, interruption...)."""


class Interrupted(TrainingError):
    """SIGINT/SIGTERM stopped a run after saving a checkpoint; the message says how to resume."""


class ProcessLost(TrainingError):
    """Another process of a run of several stopped (killed, crashed, its host gone); this one stops too."""


class HeadlessCheckpoint(ConfigError):
    """A checkpoint without a classifier (DINOv2, CLIP, SigLIP) was loaded without a number of classes."""
