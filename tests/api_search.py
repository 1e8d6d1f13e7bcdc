"""An outside random search through the Python API (tests/test_api.py): 20 proposals
from a seeded generator, at most 4 evaluations in flight, each told as it completes.
Run twice: the first process is killed half-way, the second (a new client) asks the
same proposals and collects every result. Prints `told <smoothing> <id> <accuracy>`."""

import json
import random
import sys

import orchestrator as orch

broker, root = sys.argv[1], sys.argv[2]
client = orch.Client(broker, results_root=root)
rng = random.Random(7)
asked = [round(rng.uniform(0.1, 5.0), 4) for _ in range(20)]
pending: set[orch.RunFuture] = set()
told: dict[str, float] = {}
i = 0
while len(told) < len(asked):
    while i < len(asked) and len(pending) < 4:
        pending.add(client.evaluate("slow", {"seconds": 0.3, "smoothing": asked[i]}, "iris",
                                    experiment="search", resources={"gpus": 0}))
        i += 1
    future = next(orch.as_completed(pending, timeout=120))
    pending.discard(future)
    told[future.id] = future.result().accuracy
    print("told", future.params["smoothing"], future.id, told[future.id], flush=True)
print(json.dumps({"told": len(told), "best": max(told.values())}), flush=True)
