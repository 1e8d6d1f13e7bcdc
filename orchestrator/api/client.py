"""`Client`: validate, plan and submit experiments, evaluate parameter points on the
cluster, and find experiments and evaluations again; `local()`: a private cluster for
the length of a `with` block, as `orchestrator run` starts one.

Configs are YAML paths, folders, or plain dicts with the YAML's schema. Problems raise
the CLI's error classes with its messages (orchestrator.errors): ConfigError carries
every problem (`.problems`: file, key path, message).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, OrchestratorError, Problem
from ..experiment.config import DICT_FILE, Config
from .futures import RunFuture
from .handle import Experiment
from .session import Session

if TYPE_CHECKING:
    from ..experiment.config import Experiment as Validated
    from ..experiment.plan import GroupPlan

Configs = Config | Sequence[Config]
# Seconds an evaluation's "published" mark lives in Redis (as long as the live state).
EVALUATION_MARK_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class Checked:
    """A valid experiment, as `orchestrator validate` reports it."""

    name: str
    file: str
    runs: int
    groups: int


@dataclass(frozen=True)
class Plan:
    """What submitting an experiment would do (`orchestrator plan --json`): `totals`
    (runs, done, to_run, groups, groups_to_finalize) and one row per run (name, run_id,
    group_id, queue, state). For a search, `search` instead: its config, what it has
    done (`progress`) and the proposals its next step would make (`next`: number,
    params, point), as `orchestrator plan` prints them; totals and runs are then empty."""

    experiment: str
    totals: dict[str, int]
    runs: list[dict[str, Any]]
    paused: bool
    search: dict[str, Any] | None = None


def _as_list(configs: Configs) -> list[Config]:
    if isinstance(configs, str | os.PathLike | Mapping):
        return [configs]
    return list(configs)


class Client(Session):
    """The cluster at `broker` (default ORCH_BROKER_URL) and the results under
    `results_root` (default ORCH_RESULTS_ROOT, else ./results).

    Reading (validate, plan, experiments, results, status) needs no broker; submitting,
    evaluating and steering do.

    Example::

        import orchestrator as orch

        client = orch.Client("redis://head:6379/0", results_root="/shared/results")
        exp = client.submit({"experiment": "demo", "trainer": "prior",
                             "datasets": ["iris"], "folds": 3, "resources": {"gpus": 0}})
        exp.wait()
        print(exp.results()[0]["accuracy"])
    """

    # -- configs -------------------------------------------------------------------
    def load(self, configs: Configs) -> list[Validated]:
        """Every experiment of `configs`, validated (ConfigError naming every problem)."""
        from ..experiment.config import load_configs

        return load_configs(_as_list(configs))

    def validate(self, configs: Configs) -> list[Checked]:
        """Check configs (paths, folders or dicts) as `orchestrator validate` does:
        ConfigError with every problem, else each experiment's name and size."""
        from ..experiment.expand import expand

        out = []
        for exp in self.load(configs):
            runs = expand(exp)
            out.append(Checked(exp.name, exp.file, len(runs), len({r.group_id for r in runs})))
        return out

    def plan(self, configs: Configs) -> list[Plan]:
        """What submitting would do, given what the results root holds (`orchestrator plan`)."""
        from ..dispatch.steering import paused_info
        from ..experiment.expand import expand
        from ..experiment.plan import make_plan, plan_rows, totals

        out = []
        for exp in self.load(configs):
            paused = paused_info(self.layout, exp.name) is not None
            if exp.search is not None:
                from ..search.client import search_plan

                out.append(Plan(exp.name, {}, [], paused, search_plan(self.layout, exp)))
                continue
            plans = make_plan(self.layout, expand(exp))
            out.append(Plan(exp.name, totals(plans), plan_rows(self.layout, plans), paused))
        return out

    # -- experiments -----------------------------------------------------------------
    def submit(self, configs: Configs) -> Experiment:
        """Submit one experiment (a path, a dict): `orchestrator submit`. Runs DONE under
        the results root are skipped. Returns its handle at once; `.wait()` waits.

        A config with a `search:` block starts (or resumes) the search on the control
        side, as `orchestrator submit` does; `.wait()` waits for it to end and
        `.best(k)` gives its best trials (docs/api.md, docs/search.md)."""
        exps = self.load(configs)
        if len(exps) != 1:  # before anything is submitted
            raise OrchestratorError(f"submit takes one experiment, {len(exps)} were given "
                                    f"({', '.join(e.name for e in exps)}): use submit_all")
        return self._submit(exps)[0]

    def submit_all(self, configs: Configs) -> list[Experiment]:
        """Submit every experiment of `configs` (a folder, a list)."""
        return self._submit(self.load(configs))

    def _submit(self, exps: list[Validated]) -> list[Experiment]:
        """As `orchestrator submit`: each search's config recorded, the other experiments'
        plans published, then a step of each search that has not ended."""
        from ..dispatch.submission import submit_experiments
        from ..experiment.expand import expand
        from ..experiment.plan import make_plan
        from ..search.client import save_searches, start_searches

        self.connect()
        searches = [e for e in exps if e.search is not None]
        plain = [e for e in exps if e.search is None]
        todo = save_searches(searches, self.layout)
        plans = {e.name: make_plan(self.layout, expand(e)) for e in plain}
        submit_experiments(plain, plans, self.layout)  # (reaches the broker first, searches or not)
        start_searches(todo)
        return [Experiment(self, e.name) for e in exps]

    def experiment(self, name: str) -> Experiment:
        """The experiment `name` under the results root (ExperimentNotFound if none)."""
        from ..dispatch.manifest import load_manifest

        load_manifest(self.layout, name)
        return Experiment(self, name)

    def experiments(self) -> list[Experiment]:
        """Every experiment under the results root, by name."""
        from ..dispatch.manifest import experiments

        return [Experiment(self, name) for name in experiments(self.layout)]

    # -- evaluations -----------------------------------------------------------------
    def evaluate(self, trainer: str, params: Mapping[str, Any] | None = None,
                 dataset: str | Mapping[str, str] = "iris", *, experiment: str = "evaluations",
                 seed: int = 0, folds: int | None = None, validation: float | None = None,
                 holdout: float = 0.2, resources: Mapping[str, float] | None = None,
                 retries: int = 0, timeout: float | None = None, priority: int = 5) -> RunFuture:
        """Evaluate one parameter point of a trainer on a dataset, on the cluster.

        It is an ordinary run of the experiment `experiment` (leases, fencing, status,
        `watch`, Flower): one train/validation split (`validation`, default 0.2), or
        `folds` k-fold runs and their ensemble. The same evaluation (trainer and version,
        params, dataset, seed, split) is trained once: evaluated again, by this or any
        client, it is the same future (finished, or still training). ConfigError names
        each bad key. `resources` as the YAML's (default: one GPU; {"gpus": 0}: CPU).

        Example::

            future = client.evaluate("mlp", {"lr": 0.01, "hidden": [32]}, "iris")
            print(future.result(timeout=600).accuracy)
        """
        return self.map(trainer, [params or {}], dataset, experiment=experiment, seed=seed,
                        folds=folds, validation=validation, holdout=holdout, resources=resources,
                        retries=retries, timeout=timeout, priority=priority)[0]

    def map(self, trainer: str, points: Iterable[Mapping[str, Any]],
            dataset: str | Mapping[str, str] = "iris", *, experiment: str = "evaluations",
            seed: int = 0, folds: int | None = None, validation: float | None = None,
            holdout: float = 0.2, resources: Mapping[str, float] | None = None,
            retries: int = 0, timeout: float | None = None, priority: int = 5) -> list[RunFuture]:
        """`evaluate` for many parameter points at once (one submission): a future for
        each, in order. Problems of every point are reported together (key `points[i]`)."""
        given = [dict(p) for p in points]
        doc: dict[str, Any] = {"experiment": experiment, "trainer": trainer, "datasets": [dataset],
                               "holdout": holdout, "seeds": [seed], "retries": retries,
                               "priority": priority}
        if folds is not None:
            doc["folds"] = folds
        if validation is not None or folds is None:
            doc["split"] = {"validation": 0.2 if validation is None else validation}
        if resources is not None:
            doc["resources"] = dict(resources)
        if timeout is not None:
            doc["timeout"] = timeout
        exp, order = self._evaluation_config(doc, given)
        futures = self._evaluate(exp)
        return [futures[name] for name in order]

    def _evaluation_config(self, doc: dict[str, Any],
                           points: list[dict[str, Any]]) -> tuple[Validated, list[str]]:
        """The experiment of these points: the doc validated once per client (its
        problems named by the doc's keys), then each point's params checked against the
        trainer, all problems together."""
        import json

        from ..experiment.config import load_configs
        from ..experiment.names import did_you_mean
        from ..experiment.sweep import point_name

        key = json.dumps(doc, sort_keys=True, default=repr)
        exp = self._base.get(key)
        if exp is None:
            exp = self._base[key] = load_configs([doc])[0]
        problems: list[Problem] = []
        named: dict[str, tuple[str, dict[str, Any]]] = {}
        order: list[str] = []
        trainer = exp.trainer
        for i, params in enumerate(points):
            where = "params" if len(points) == 1 else f"points[{i}]"
            for name, value in params.items():
                spec = trainer.params.get(str(name))
                if spec is None:
                    problems.append(Problem(DICT_FILE, f"{where}.{name}", (
                        f"unknown parameter {name!r} for trainer {trainer.name!r}"
                        f"{did_you_mean(str(name), list(trainer.params))}; valid: {', '.join(trainer.params)}")))
                elif (problem := spec.problem(value)) is not None:
                    problems.append(Problem(DICT_FILE, f"{where}.{name}", problem))
                elif spec.kind == "float" and not isinstance(value, bool):
                    # An optimiser's 1 and 1.0 are one point (one run_id, one folder).
                    params[name] = float(value)
            ordered = dict(sorted(params.items()))  # a point's name and folder: in one order
            order.append(point_name(ordered))
            named.setdefault(order[-1], (order[-1], ordered))
        if problems:
            raise ConfigError(problems)
        return dataclasses.replace(exp, points=tuple(named.values())), order

    def _evaluate(self, exp: Validated) -> dict[str, RunFuture]:
        """Publish what is neither done nor in flight; a future per point name."""
        from .. import keys
        from ..collect.status import Status, fold_state
        from ..dispatch.submission import submit_experiments
        from ..experiment.expand import expand, groups
        from ..experiment.plan import RUN, make_plan

        url = self.connect()
        specs = expand(exp)
        plans = make_plan(self.layout, specs)
        live = self.live()
        # Runs some client published already and that did not end FAILED or CANCELLED:
        # in flight (or queued), not published again.
        todo = [s for p in plans if p.action == RUN for s in p.todo]
        with self.redis_errors(url):
            marks: list[Any] = live.client.mget([keys.evaluation(s.run_key) for s in todo]) if todo else []  # type: ignore[assignment]
        marked = {s.run_key for s, m in zip(todo, marks, strict=True) if m is not None}
        ended = (Status.FAILED.value, Status.CANCELLED.value)

        def in_flight(p: GroupPlan) -> bool:
            return (p.action == RUN and all(s.run_key in marked for s in p.todo)
                    and not any(fold_state(self.layout, s)[0] in ended for s in p.todo))

        publish = [p for p in plans if not in_flight(p)]
        if publish:
            # The broker was reached once: a later evaluation that cannot publish raises
            # all the same (and is published again by the next evaluate of it).
            submit_experiments([exp], {exp.name: publish}, self.layout, add=True,
                               check=self._reached != url, live=live)
            self._reached = url
            now = repr(time.time())
            with self.redis_errors(url):
                pipe = live.client.pipeline(transaction=False)
                for p in publish:
                    for s in p.todo:
                        pipe.set(keys.evaluation(s.run_key), now, ex=EVALUATION_MARK_SECONDS)
                pipe.execute()
        return {g[0].point: RunFuture(self, tuple(g)) for g in groups(specs)}

    def future(self, id: str, experiment: str | None = None) -> RunFuture:
        """The evaluation (or any group) with this id, found in the manifests under the
        results root (in `experiment`'s, if given): a new process finds its runs again.
        KeyError if no manifest lists it."""
        from ..dispatch.manifest import experiments, load_manifest
        from ..experiment.spec import RunSpec

        for name in [experiment] if experiment else experiments(self.layout):
            for g in load_manifest(self.layout, name)["groups"]:
                if g["group_id"] == id or id in g["run_ids"]:
                    return RunFuture(self, tuple(RunSpec.from_dict(r) for r in g["runs"]))
        raise KeyError(f"no evaluation or group {id!r} under {self.results_root}")

    def futures(self, experiment: str = "evaluations") -> list[RunFuture]:
        """A future for every group of an experiment (every evaluation made into it)."""
        from ..dispatch.manifest import load_manifest
        from ..experiment.spec import RunSpec

        return [RunFuture(self, tuple(RunSpec.from_dict(r) for r in g["runs"]))
                for g in load_manifest(self.layout, experiment)["groups"]]


@contextlib.contextmanager
def local(workers: int = 2, results_root: str | os.PathLike[str] | None = None,
          loglevel: str = "WARNING", gpus: Sequence[int] | None = None) -> Iterator[Client]:
    """A private cluster for the `with` block, as `orchestrator run` starts one: a
    redis-server on a free port, one worker per GPU found (or `workers` CPU workers, which
    also take runs that ask for a GPU when there is none) and a control worker. Yields a
    Client for it; stops every process at the end of the block (runs left unfinished
    stay PENDING or IN_PROGRESS in their files: submitting them again resumes them).

    The workers inherit this process's environment; the modules of trainers declared
    here with `@orch.trainer` (other than __main__) are added to their
    ORCH_TRAINER_MODULES.

    Example::

        with orch.local(workers=2) as client:
            exp = client.submit("configs/iris_kfold.yaml")
            exp.wait()
    """
    from .. import settings
    from ..cluster.endpoints import results_root_path
    from ..cluster.local import LocalCluster
    from ..trainers import functions

    root = results_root_path(results_root, writable=True)
    if gpus is None:
        from ..cluster.gpu import detect

        gpus = [g.index for g in detect()]
    modules = list(settings.value("ORCH_TRAINER_MODULES"))
    modules += [m for m in functions.DECLARED if m != "__main__" and m not in modules]
    if functions.DECLARED.get("__main__"):
        import warnings

        warnings.warn(f"trainers {sorted(functions.DECLARED['__main__'])} are declared in __main__ (a "
                      "script or notebook): the workers cannot import them, so their runs would fail "
                      "(refused); declare them in a module (docs/api.md)", stacklevel=3)
    cluster = LocalCluster(results_root=root, cpu_workers=workers, gpus=list(gpus), cpu_runs=True,
                           loglevel=loglevel, env={"ORCH_TRAINER_MODULES": ",".join(modules)})
    try:
        url = cluster.start()
        client = Client(url, root)
        client.private = True
        client.cluster = cluster
        client.connect()
        yield client
    finally:
        cluster.stop()
