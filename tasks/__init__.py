"""The Celery app: `celery -A tasks worker` / `celery -A tasks flower` find `app` here.

Settings come only from `celeryconfig.py` (see its docstring for why).
"""

from celery import Celery

app = Celery("tasks")
app.config_from_object("celeryconfig")

from . import admission, fleet, respawn, training, watchdog  # noqa: E402,F401  (register tasks and worker hooks)

__all__ = ["app"]
