"""The `orchestrator` command: each subcommand parses, calls one library function, prints.

Errors a user can cause end in a one-paragraph message and a documented exit code
(orchestrator.errors), never a traceback.
"""

from __future__ import annotations

import gc
import sys

import click
from rich.markup import escape

from .. import errors
from ..errors import OrchestratorError
from . import (  # noqa: F401  (each registers its commands)
    control,
    experiments,
    fleet,
    flowercmd,
    reporting,
    running,
    watching,
    workers,
)
from .base import cli, err

__all__ = ["cli", "main"]


def main() -> None:
    try:
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
    finally:
        # Done: at exit, Python's last cycle collection would walk every object that
        # the imports made (Celery, kombu, rich...) to free memory the process gives
        # back anyway, 50-100 ms of every command here. Frozen objects are skipped;
        # atexit handlers and the modules' teardown still run.
        gc.freeze()
