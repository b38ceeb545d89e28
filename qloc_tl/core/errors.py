"""The qloc_tl error hierarchy.

Every error raised on bad user input derives from :class:`QlocError` *and* from the builtin
exception a caller would expect (``ValueError`` for a bad value, ``TypeError`` for a bad type),
so ``except ValueError`` keeps working while ``except qloc_tl.QlocError`` catches everything of ours.
Messages name the offending value and say how to fix it.
"""

from __future__ import annotations

__all__ = [
    "QlocError",
    "InvalidInputError",
    "UnsupportedModelError",
    "CapabilityError",
    "HookNotFiredError",
    "NumericalError",
    "DataError",
    "ResumeMismatchError",
    "OutputError",
    "ResourceError",
]


class QlocError(Exception):
    """Base class of every error raised by qloc_tl."""


class InvalidInputError(QlocError, ValueError):
    """A value passed to a public function is out of range or inconsistent."""


class UnsupportedModelError(QlocError, TypeError):
    """The object passed as ``model`` is not a TransformerLens model, or lacks a needed hook."""


class CapabilityError(QlocError, RuntimeError):
    """The model's backend does not honour an intervention that the call needs
    (e.g. attention-pattern edits on a TL 3.9 native bridge)."""


class HookNotFiredError(QlocError, RuntimeError):
    """A hook created by a qloc_tl factory was registered but never ran during a forward pass."""


class NumericalError(QlocError, FloatingPointError):
    """A computation produced inf/NaN (e.g. fp16 activations overflowing during IG)."""


class DataError(QlocError, ValueError):
    """A dataset file or directory is missing or malformed."""


class ResumeMismatchError(QlocError, ValueError):
    """A results directory was written by another configuration and cannot be resumed."""


class OutputError(QlocError, OSError):
    """An output file could not be written (read-only directory, missing permission, full disk). Writes are
    atomic, so no half-written file is left behind; what was stored before stays valid for ``--resume``."""


class ResourceError(QlocError, MemoryError):
    """A computation does not fit in the device's memory even in its smallest passes (one prompt, one sample per
    pass); the message says what to lower. Larger passes that run out of memory are halved and retried first."""
