import sys

from .cluster import prestart

prestart.start(sys.argv)  # `run` in local mode: its workers' fork server starts now

from .cli import main  # noqa: E402

main()
