"""The `orchestrator` command: each subcommand parses, calls one library function, prints.

Errors a user can cause end in a one-paragraph message and a documented exit code
(orchestrator.errors), never a traceback.
"""

from __future__ import annotations

import atexit
import gc
import sys

from ..cluster import prestart, warm

prestart.start(sys.argv)  # `orchestrator run` in local mode: its workers' fork server, now

import click  # noqa: E402
from rich.markup import escape  # noqa: E402

from .. import errors, settings  # noqa: E402
from ..errors import OrchestratorError  # noqa: E402
from . import (  # noqa: E402, F401  (each registers its commands)
    control,
    deadletters,
    experiments,
    flower,
    reporting,
    roles,
    running,
    searching,
    watching,
    worker,
    workers,
)
from .base import cli, err  # noqa: E402

__all__ = ["cli", "main"]


def main() -> None:
    # At exit, Python's last cycle collection would walk every object that the imports
    # made (Celery, kombu, rich...) to free memory the process gives back anyway: 50-100
    # ms of every command here. Frozen objects are skipped; the modules' teardown still
    # runs. (At exit, not when the command ends: a process calling main() in a loop,
    # like the tests, keeps collecting until then.)
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    try:
        settings.check_all()  # before anything starts or is enqueued
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(errors.EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(errors.EXIT_USAGE)
    except OrchestratorError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(errors.EXIT_INTERRUPTED)


warm.entry = main  # what `workers up` runs in the workers it forks (orchestrator.cluster.warm)
