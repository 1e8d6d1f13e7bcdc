"""A search (a config with a `search:` block) through the Python API on orch.local()
(tests/test_api.py runs it as a script): a small evolution search of the cheap
`objective` trainer submitted as a dict, waited on, its best trials read; then the
same config submitted again, which finds the search ended. Prints one JSON object."""

import json
import sys
from typing import Any

import orchestrator as orch

root = sys.argv[1]
config: dict[str, Any] = {
    "experiment": "evo_py", "trainer": "objective", "datasets": ["iris"],
    "split": {"validation": 0.25}, "holdout": 0, "resources": {"gpus": 0}, "params": {"epochs": 2},
    "search": {"strategy": "evolution", "metric": "reported.score", "seed": 5,
               "space": {"x": {"uniform": [-4, 4]}, "y": {"uniform": [-4, 4]},
                         "kind": {"choice": ["a", "b", "c"]}},
               "evolution": {"population": 4, "generations": 2, "tournament": 2, "elitism": 1}},
}
out: dict[str, Any] = {}
(plan,) = orch.Client(results_root=root).plan(config)  # the search and its first proposals
out["plan"] = {"totals": plan.totals, "search": plan.search}
with orch.local(workers=2, results_root=root) as client:
    exp = client.submit(config)
    out["is_search"] = exp.is_search()
    out["early"] = exp.status()["search"]["trials"]  # at once: before or after its first step
    status = exp.wait(timeout=120, progress=False)
    out["status"] = status
    out["done"] = exp.done()
    out["best"] = exp.best(3)
    try:
        exp.best(3, metric="accuracy")
        out["metric_refused"] = False
    except ValueError:
        out["metric_refused"] = True
    again = client.submit(config)  # the search has ended: nothing is started again
    out["again"] = again.wait(timeout=10, progress=False)["search"]
    out["again_best"] = again.best(3)
    out["experiments"] = [e.name for e in client.experiments()]
out["optuna"] = "optuna" in sys.modules  # the control side's, never the submitter's
print(json.dumps(out))
