"""Where a command or a Python client works: the results root and the cluster's Redis.

Plain functions the CLI and the Python API (orchestrator.api) share; no printing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .. import errors
from ..errors import EnvironmentProblem


def results_root_path(value: str | os.PathLike[str] | None, writable: bool = False) -> Path:
    """The results root; for commands that write, checked to be a writable folder."""
    root = Path(value or os.environ.get("ORCH_RESULTS_ROOT", "results")).resolve()
    if writable:
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise EnvironmentProblem(f"results root {root} is not a writable folder: "
                                     f"{exc.strerror or exc}") from None
    return root


def check_redis_url(url: str, what: str) -> str:
    """A Redis URL redis-py can use, or a usage error naming where it came from."""
    from urllib.parse import urlsplit

    from redis.connection import parse_url

    problem = ""
    db = urlsplit(url).path.strip("/")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        problem = "it must start with redis://, rediss:// or unix://"
    elif url.startswith("redis") and db and not db.isdigit():
        problem = f"the database after the last '/' must be a number, got {db!r}"
    else:
        try:
            parse_url(url)
        except ValueError as exc:
            problem = str(exc)
    if problem:
        raise errors.OrchestratorError(
            f"{what} {url!r} is not a usable Redis URL: {problem} "
            "(expected redis://[:password@]host:port/db)")
    return url


def use_broker(url: str, results_root: Path, private: bool = False) -> None:
    """Point this process (and `tasks`, imported later) at a broker and results root.

    A private (local-mode) Redis is also the result backend and the live state, whatever
    the environment says: its workers were started that way, and polling another Redis
    would wait forever.
    """
    if not private:
        check_redis_url(url, "broker URL (--broker / ORCH_BROKER_URL)")
        for name in ("ORCH_RESULT_BACKEND", "ORCH_STATE_URL"):
            if os.environ.get(name):
                check_redis_url(os.environ[name], name)
    os.environ["ORCH_BROKER_URL"] = url
    if private:
        os.environ["ORCH_RESULT_BACKEND"] = os.environ["ORCH_STATE_URL"] = url
    os.environ.setdefault("ORCH_RESULT_BACKEND", url)
    os.environ.setdefault("ORCH_STATE_URL", os.environ["ORCH_RESULT_BACKEND"])
    os.environ["ORCH_RESULTS_ROOT"] = str(results_root)


@contextlib.contextmanager
def redis_errors(url: str) -> Iterator[None]:
    """Redis (or kombu) failing inside the block: an EnvironmentProblem that names the
    server (without its password) and whether it refused or could not be reached."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    try:
        yield
    except (RedisError, OperationalError) as exc:
        from redis.exceptions import NoPermissionError

        from .registry import redact

        what = ("Redis refused a command to this user (its ACL: docs/security.md)"
                if isinstance(exc, NoPermissionError) else "cannot reach Redis")
        raise errors.EnvironmentProblem(f"{what} at {redact(url)}: {exc}") from None
