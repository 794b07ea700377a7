"""The exceptions a user can cause. The CLI prints them in one line, without a traceback."""

from __future__ import annotations


class BigmergeError(Exception):
    """Base of every error that is the input's fault, not the program's."""

    exit_code = 2


class ConfigError(BigmergeError):
    """The YAML config is malformed or asks for something impossible."""


class SourceError(BigmergeError):
    """A source checkpoint is unreadable, corrupt or disagrees with the others."""


class StorageError(BigmergeError):
    """Object storage or the file system refused a read or a write."""


class EvaluationError(BigmergeError):
    """An evaluation of a candidate failed (its command, its backend), retries included."""


class OutputExistsError(BigmergeError):
    """The output already holds a finished merge, or a merge of another config."""


class VerifyError(BigmergeError):
    """`bigmerge verify` found a tensor whose bytes do not match the manifest."""

    exit_code = 3


class UnsafeOutputError(BigmergeError):
    """OUT overlaps an input (a source, statistics, coefficients), or holds files bigmerge did not write."""


class OutputLockedError(BigmergeError):
    """Another bigmerge merge is writing into the same OUT."""
