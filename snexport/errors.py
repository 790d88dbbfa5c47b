"""One exception tree for everything snexport refuses to do.

Every message says what was asked, what exists, and what to do next, in one line: the CLI prints
``str(error)`` in red and exits non-zero, so the message is the whole user interface of a failure.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class SnexportError(Exception):
    """Base class: an expected failure caused by input or environment, not a bug."""

    exit_code = 1


class SettingsError(SnexportError, ValueError):
    """An option value outside what the library accepts (a ValueError too, for library callers)."""


class UnknownModelError(SnexportError):
    """A model name that neither our aliases nor timm know."""

    @classmethod
    def for_name(cls, name: str, known: Iterable[str]) -> "UnknownModelError":
        close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        return cls(f"unknown model '{name}'.{hint} Run `snexport plan --help` for aliases, or pass any timm ViT name.")


class IncompatibleAnchorsError(SnexportError):
    """Anchors that cannot be stitched (patch/image size, token count, not a plain ViT)."""


class WeightsError(SnexportError):
    """Pretrained weights that are missing, unreadable or do not fit the architecture."""


class DataError(SnexportError):
    """A dataset that is missing, empty or not laid out as expected."""


class BuildDirError(SnexportError):
    """A build directory that is missing a stage's input, or belongs to another plan."""


class UnknownStitchError(SnexportError):
    @classmethod
    def for_id(cls, stitch_id: str, valid: Iterable[str]) -> "UnknownStitchError":
        valid = list(valid)
        close = difflib.get_close_matches(stitch_id, valid, n=3, cutoff=0.6)
        hint = f" Closest: {', '.join(close)}." if close else ""
        shown = ", ".join(valid[:8]) + (f", ... ({len(valid)} in all)" if len(valid) > 8 else "")
        return cls(f"no stitch '{stitch_id}' in this plan.{hint} Valid ids: {shown}")


class ExportValidationError(SnexportError):
    """An exported model that disagrees with its PyTorch reference; lists every failing check at once."""

    def __init__(self, stitch_id: str, failures: list[str]):
        self.stitch_id = stitch_id
        self.failures = list(failures)
        super().__init__(f"export of {stitch_id} failed validation: " + "; ".join(self.failures))


class BackendUnavailableError(SnexportError):
    """A runtime (TensorRT, CUDA, onnxruntime) that this machine does not have."""


class ProfileError(SnexportError):
    """A device profile that does not exist or has unknown/invalid keys."""


class ManifestError(SnexportError):
    """A manifest that is missing, truncated, or fails its schema."""


class StorageError(SnexportError):
    """A disk that refuses writes (read-only, full, no permission): finished work is kept; fix it and re-run."""


class BudgetError(SnexportError):
    """No engine meets the caller's budget and the caller asked for strict selection."""
