"""What a notebook does with the Python API (tests/test_api.py runs it as a script):
a private cluster, a dict config submitted and waited on, results read as records, a
function trainer (from ORCH_TRAINER_MODULES) evaluated; then the cluster is stopped.
Prints one JSON object for the test to check."""

import json
import sys

import redis

import orchestrator as orch

root = sys.argv[1]
out: dict[str, object] = {}
with orch.local(workers=2, results_root=root) as client:
    exp = client.submit({"experiment": "nb", "trainer": "prior", "datasets": ["iris"], "folds": 3,
                         "sweep": {"grid": {"smoothing": [0.5, 2.0]}}, "resources": {"gpus": 0}})
    status = exp.wait(timeout=120, progress=False)
    out["status"] = {"runs": status["runs"], "groups": status["groups"]}
    out["results"] = exp.results()
    out["best"] = exp.best(1)
    out["files"] = exp.files()
    out["experiments"] = [e.name for e in client.experiments()]
    future = client.evaluate("centroid_fn", {"temperature": 0.5}, "iris", resources={"gpus": 0})
    result = future.result(timeout=120)
    out["function"] = {"id": future.id, "state": future.state(), "accuracy": result.accuracy,
                       "metrics": result.metrics, "dir": str(result.dir)}
    # A data-parallel evaluation (issue 18) through the same API: 2 ranks on the 2 workers.
    dp = client.evaluate("mlp", {"epochs": 3, "hidden": [8], "batch_size": 32}, "iris",
                         resources={"gpus": 0, "ranks": 2})
    dp_result = dp.result(timeout=180)
    out["ranks"] = {"state": dp.state(), "accuracy": dp_result.accuracy, "dir": str(dp_result.dir)}
    cluster = client.cluster
    assert cluster is not None
    out["processes"] = sorted(cluster.processes)
    url = client.broker
    assert url is not None
procs = cluster.processes.values()
out["stopped"] = all(p.poll() is not None for p in procs)
try:
    redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    out["redis_after"] = "answers"
except redis.RedisError:
    out["redis_after"] = "gone"
print(json.dumps(out))
