"""`Session`: the part of a Client that handles, futures and the client share: the
results root, the broker and its live state, and the checks made while waiting."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EnvironmentProblem, OrchestratorError
from ..paths import Layout

if TYPE_CHECKING:
    from ..cluster.local import LocalCluster
    from ..execution.leases import Leases
    from ..experiment.config import Experiment as Validated
    from ..livestate import LiveState
    from ..views.progress import Tracked


class Session:
    """The cluster at `broker` (default ORCH_BROKER_URL) and the results under
    `results_root` (default ORCH_RESULTS_ROOT, else ./results)."""

    def __init__(self, broker: str | None = None, results_root: str | os.PathLike[str] | None = None):
        from ..cluster.endpoints import check_redis_url, results_root_path

        self.broker = broker or os.environ.get("ORCH_BROKER_URL") or None
        if self.broker:
            check_redis_url(self.broker, "broker URL (Client(broker=...) / ORCH_BROKER_URL)")
        self.results_root: Path = results_root_path(results_root)
        self.layout = Layout(self.results_root)
        self.cluster: LocalCluster | None = None  # set by local(): checked while waiting
        self.private = False  # orch.local()'s own Redis: also the backend and live state
        self._live: LiveState | None = None
        self._base: dict[str, Validated] = {}  # evaluate's validated configs, by their JSON
        self._reached: str | None = None  # the broker evaluate published to last

    def __repr__(self) -> str:
        from ..cluster.registry import redact

        broker = redact(self.broker) if self.broker else None
        return f"Client(broker={broker!r}, results_root={str(self.results_root)!r})"

    # -- the cluster -----------------------------------------------------------------
    def connect(self) -> str:
        """Point this process at the broker (as `--broker` does); its URL. A usage error
        without one."""
        from ..cluster.endpoints import results_root_path, use_broker

        if not self.broker:
            raise OrchestratorError(
                "no broker configured: Client(broker='redis://HOST:6379/0') or ORCH_BROKER_URL, "
                "or use orch.local() for a private cluster")
        results_root_path(self.results_root, writable=True)
        use_broker(self.broker, self.results_root, private=self.private)
        return os.environ["ORCH_STATE_URL"]

    def live(self) -> LiveState:
        """The cluster's live state (Redis)."""
        from ..livestate import LiveState

        url = self.connect()
        if self._live is None:
            self._live = LiveState.from_url(url)
        return self._live

    def live_or_none(self) -> LiveState | None:
        return self.live() if self.broker else None

    def steering(self) -> tuple[Leases, LiveState, str]:
        from ..execution.leases import Leases

        url = self.connect()
        return Leases.from_url(url), self.live(), url

    @staticmethod
    def redis_errors(url: str) -> contextlib.AbstractContextManager[None]:
        from ..cluster.endpoints import redis_errors

        return redis_errors(url)

    def check_cluster(self) -> None:
        """EnvironmentProblem if a process of this client's local cluster died."""
        if self.cluster is not None and (dead := self.cluster.dead()):
            raise EnvironmentProblem(f"local {dead[0]} process exited unexpectedly; its log ends:\n"
                                     f"{self.cluster.log_tail(dead[0])}")

    def checker(self, deadline: float | None, what: str) -> Callable[[], None]:
        def check() -> None:
            self.check_cluster()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not finish in time (it goes on; wait again)")
        return check

    def tracked(self, name: str) -> Tracked:
        """The groups of an experiment's manifest, for a progress wait."""
        from ..dispatch.manifest import load_manifest
        from ..experiment.plan import RUN, GroupPlan
        from ..experiment.spec import RunSpec
        from ..views.progress import Tracked

        plans = []
        for g in load_manifest(self.layout, name)["groups"]:
            specs = tuple(RunSpec.from_dict(r) for r in g["runs"])
            plans.append(GroupPlan(specs=specs, todo=(), action=RUN))
        return Tracked(name, plans)

