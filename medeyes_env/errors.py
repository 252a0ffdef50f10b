"""The one exception hierarchy of MedEyes.

Every error a user can cause is a subclass of :class:`MedEyesError`, so callers
can catch everything the project raises on purpose with one ``except``.
"""

from __future__ import annotations


class MedEyesError(Exception):
    """Base class of every error MedEyes raises on purpose."""


class CaseError(MedEyesError, ValueError):
    """A case, its image or its annotations are invalid."""


class ImageLoadError(CaseError):
    """An image file is missing, unreadable, corrupt or too large."""


class UnsafePathError(MedEyesError, ValueError):
    """A path escapes the directory it must stay inside."""


class SourceError(MedEyesError, ValueError):
    """A data source spec is unknown, or its files are missing or malformed."""


class ConfigError(MedEyesError, ValueError):
    """A configuration value is invalid."""


class RecordError(MedEyesError, ValueError):
    """A stored record (trajectory, checkpoint) is malformed or of an unknown version."""


class StoreMismatchError(RecordError):
    """A trajectory store holds episodes of another agent, dataset or setting than the run resuming it."""
