"""The one exception family of normfold.

Every error a user can cause derives from `NormfoldError`; the CLI catches it once and prints one line.
`exit_code` is the CLI's exit status for that error.
"""

from __future__ import annotations


class NormfoldError(Exception):
    """Base of every error normfold raises on purpose."""

    exit_code = 2


class InputError(NormfoldError):
    """The model, a file or an argument cannot be used as given (exit 2)."""


class UnsafePathError(InputError):
    """A path (external data, output) points where normfold must not read or write."""


class VerificationError(NormfoldError):
    """The candidate model does not compute the same function as the reference (exit 1)."""

    exit_code = 1


class RuntimeUnavailableError(NormfoldError):
    """onnxruntime or the requested execution provider is not available (exit 2)."""
