"""The exception tree. Every error a user can cause is a ``MoespecError``; ``assert`` is for invariants only."""

from __future__ import annotations


class MoespecError(Exception):
    """Base class of every error moespec raises on purpose."""


class ConfigError(MoespecError):
    """A configuration file or value is invalid.

    Parameters
    ----------
    problems : list of str
        One line per problem, each naming the file and the dotted key.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class DataError(MoespecError):
    """Input data cannot be used (empty dataset, missing field, NaN rows, too few points...)."""


class ArtifactError(MoespecError):
    """An artifact is missing, corrupt, truncated or does not match its schema."""


class StageError(MoespecError):
    """A stage task failed; wraps the original error with the task it belongs to."""


class ClusterError(MoespecError):
    """The scheduler refused or lost a job."""


class SyncError(MoespecError):
    """A transfer between the cluster and this machine failed."""
