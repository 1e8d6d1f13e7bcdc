"""The two sides of a data-parallel attempt (orchestrator.execution.gang has the protocol):
rank 0, inside the run's own attempt (`leading`), and ranks 1..N-1, each a
`tasks.train_rank` delivery (`run_rank`). Plain Python: the leader sends rank tasks
through the function it is given.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .. import keys
from ..errors import InvalidSpecError, UnknownTrainerError
from ..experiment import datasets
from ..experiment.spec import RunSpec
from ..trainers import Reporter, TrainContext
from .gang import (
    DistInfo,
    Gang,
    GangLost,
    GangNotReady,
    RankWatch,
    backend_for,
    checkpoint_every,
    checkpoint_io,
    process_group,
)
from .runner import WorkerInfo, runnable

log = logging.getLogger(__name__)

RANK_TASK = "tasks.train_rank"
Send = Callable[[str, dict[str, Any]], None]  # (queue, kwargs of tasks.train_rank)


@contextlib.contextmanager
def leading(gang: Gang, workers: list[str], worker: WorkerInfo, send: Send, checkpoint: Path | None,
            check: Callable[[], None]) -> Iterator[tuple[DistInfo, RankWatch]]:
    """Rank 0 of a reserved gang: send ranks 1..N-1 their tasks, join, meet, and yield
    what the trainer needs. Whatever ends it releases the gang's slots; a failure marks
    the attempt aborted (its other ranks stop at once) and raises GangLost when a rank
    was lost. A success removes the checkpoint (the outputs are what counts now)."""
    run = gang.run
    backend = backend_for(run.resources.backend, worker.device)
    watch: RankWatch | None = None
    try:
        for rank, name in enumerate(workers[1:], start=1):
            send(keys.rank_queue(name), {"spec": run.to_dict(), "rank": rank, "attempt": gang.attempt,
                                         "backend": backend})
            log.info("%s attempt %d: rank %d sent to %s", run.name, gang.attempt, rank, name)
        watch = RankWatch(gang, 0, worker.name, worker.host, worker.gpu).start()
        watch.wait_all()
        gang.set_state("training")
        load, save = checkpoint_io(checkpoint, check)
        with process_group(gang, 0, backend):
            log.info("%s attempt %d: all %d ranks met (%s)", run.name, gang.attempt, gang.world, backend)
            try:
                yield DistInfo(0, gang.world, backend, checkpoint_every(), load, save), watch
            except Exception as exc:
                why = watch.stop_why
                # Said first: cut off from Redis, the abort below waits for its socket timeout.
                log.warning("rank 0 of %s (attempt %d) stops: %s", run.name, gang.attempt,
                            f"{why or type(exc).__name__ + ': ' + str(exc)}"[:300])
                gang.abort(f"rank 0 stopped: {why or exc}")
                if why is not None or _collective_error(exc):
                    raise GangLost(f"{why or exc}") from exc
                raise
        gang.set_state("done")
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)
    except BaseException as exc:
        gang.abort(f"rank 0 stopped: {exc}")
        raise
    finally:
        if watch is not None:
            watch.close()
        with contextlib.suppress(Exception):  # cut off from Redis: the slots lapse by themselves
            gang.release(workers)


def not_admitted(client: Any, run: RunSpec, worker: WorkerInfo) -> str | None:
    """GPU admission of a rank r >= 1, as rank 0 had it (orchestrator.execution.admission):
    on a GPU worker, a GPU of this worker has the run's memory free (NVML) and room for its
    share (`resources.gpus`: a whole GPU each when 1). Why not, or None. The share is
    checked, not taken: rank 0 holds the run's entry, and ranks hold the run's slots."""
    from .admission import Need, Shares, free_memory_mb, worker_gpus

    mine = worker_gpus() if worker.device == "cuda" and run.resources.gpus > 0 else []
    if not mine:
        return None
    need = Need.of(run)
    if Shares(client).room(worker.host, mine, need):
        return None
    free = free_memory_mb(mine)
    short = [f"GPU {i} has {f} MiB free" for i in mine if (f := free[i]) is not None and f < need.memory_mb]
    return (f"on {worker.name}: " + ("; ".join(short) + f", the run needs {need.memory_mb} MiB" if short
                                     else "its GPU share is taken by other runs"))


def _collective_error(exc: BaseException) -> bool:
    """A torch.distributed error (a peer's connection closed, a collective timed out)."""
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("gloo", "nccl", "connection", "timed out", "timeout", "distbackend"))


def run_rank(client: Any, payload: Any, hostname: str) -> dict[str, Any]:
    """Rank r (r >= 1) of a gang: join, train in step with the others, write nothing
    (rank 0 writes the run's outputs). Ends early, saying why, when its attempt is
    fenced or aborted, or when the gang does not fill in time."""
    worker = WorkerInfo.from_env(hostname)
    try:
        run = RunSpec.from_dict(payload["spec"])
        rank, attempt, backend = int(payload["rank"]), int(payload["attempt"]), str(payload["backend"])
        if not 1 <= rank < run.resources.ranks or attempt < 1 or backend not in ("gloo", "nccl"):
            raise InvalidSpecError(f"rank {rank} of {run.resources.ranks}, attempt {attempt}, backend {backend!r}")
        trainer, params = runnable(run, worker.device)
    except (KeyError, TypeError, ValueError, InvalidSpecError, UnknownTrainerError) as exc:
        log.warning("refused a rank task: %s", exc)
        return {"status": "REFUSED", "why": str(exc)}
    gang = Gang(client, run, attempt)
    if (why := not_admitted(client, run, worker)) is not None:
        gang.refuse(rank, worker.name, why)
        log.warning("rank %d of %s (attempt %d) refused: %s", rank, run.name, attempt, why)
        return {"rank": rank, "status": "NOT_ADMITTED", "why": why}
    watch = RankWatch(gang, rank, worker.name, worker.host, worker.gpu).start()
    log.info("%s attempt %d: rank %d of %d started on %s", run.name, attempt, rank, gang.world, worker.name)
    try:
        if watch.stop_why is not None:
            return {"rank": rank, "status": "STOPPED", "why": watch.stop_why}
        watch.wait_all()
        table = datasets.load(run.dataset)
        split = datasets.split(table, run)
        reporter = Reporter(should_stop=lambda: watch.stop_why,
                            on_report=lambda last: watch.step(last.get("epoch")))
        eval_rows = np.concatenate([split.val, split.holdout])
        with process_group(gang, rank, backend):
            log.info("%s attempt %d: rank %d met the others (%s)", run.name, attempt, rank, backend)
            trainer.fn(TrainContext(
                params=params, device=worker.device, seed=run.seed, fold=run.fold, run_name=run.name,
                X_train=table.X[split.train], y_train=table.y[split.train], X_eval=table.X[eval_rows],
                n_classes=len(table.classes), reporter=reporter,
                dist=DistInfo(rank, gang.world, backend, checkpoint_every(), lambda: None, lambda _: None)))
        return {"rank": rank, "status": "DONE"}
    except (GangNotReady, GangLost) as exc:
        log.warning("rank %d of %s (attempt %d) stops: %s", rank, run.name, attempt, exc)
        return {"rank": rank, "status": "STOPPED", "why": str(exc)}
    except Exception as exc:  # noqa: BLE001 (a rank's failure is the gang's: rank 0 reports it)
        why = watch.stop_why or f"{type(exc).__name__}: {exc}"
        # Said first: cut off from Redis, the abort below waits for its socket timeout.
        log.warning("rank %d of %s (attempt %d) stops: %s", rank, run.name, attempt, why)
        gang.abort(f"rank {rank} stopped: {why}")
        return {"rank": rank, "status": "STOPPED", "why": why}
    finally:
        watch.close()
