"""Every error a user can cause, one class each, and the CLI exit code it maps to."""

from __future__ import annotations

from dataclasses import dataclass

# Documented exit codes (docs/reliability.md: "Exit codes").
EXIT_OK = 0
EXIT_RUNS_FAILED = 1  # the experiment finished but some runs FAILED
EXIT_USAGE = 2  # bad configuration or command line: nothing was enqueued
EXIT_ENVIRONMENT = 3  # something outside the config is missing: redis-server, a broker
EXIT_INTERRUPTED = 130  # Ctrl-C


class OrchestratorError(Exception):
    """Root of every error the orchestrator reports to a user without a traceback."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a config: where (file + key path) and what would be valid."""

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{where}: {self.message}"


class ConfigError(OrchestratorError):
    """One or more problems in experiment YAML files, all reported together."""

    exit_code = EXIT_USAGE

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{len(problems)} {noun} in the configuration:\n{lines}")


class SettingError(OrchestratorError, ValueError):
    """An ORCH_* environment variable whose value is not valid for its setting."""


class UnknownTrainerError(OrchestratorError):
    """A trainer name that is not registered on this process."""


class TrainerModuleError(OrchestratorError):
    """A module named in ORCH_TRAINER_MODULES that cannot be imported (reported at a worker's start)."""


class EvaluationError(OrchestratorError):
    """An evaluation (`Client.evaluate`) or experiment that ended FAILED or CANCELLED."""

    exit_code = EXIT_RUNS_FAILED

    def __init__(self, message: str, state: str = "FAILED", errors: dict[str, str] | None = None):
        super().__init__(message)
        self.state = state  # FAILED or CANCELLED
        self.errors = errors or {}  # fold (or "finalize") -> why


class InvalidSpecError(OrchestratorError):
    """A run spec (typically a broker message) that does not have the expected form."""


class UnsafeNameError(InvalidSpecError):
    """A name that would be unsafe as a path component."""


class EnvironmentProblem(OrchestratorError):
    """Something outside the config is missing or unreachable (redis-server, broker)."""

    exit_code = EXIT_ENVIRONMENT


class ExperimentNotFound(OrchestratorError):
    """`status`/`report` named an experiment that has no manifest under the results root."""


class DatasetError(OrchestratorError):
    """A dataset cannot be loaded or no longer matches the identity it was submitted with."""


class RunStopped(Exception):
    """An attempt must stop and write nothing: its lease went to another attempt (it is a
    zombie, or a warm stop handed it back) or its experiment was cancelled. Internal:
    the `train_run` task turns it into "ignore this delivery" or CANCELLED."""

    def __init__(self, reason: str, cancelled: bool = False):
        super().__init__(reason)
        self.cancelled = cancelled
