"""The Python API: `import orchestrator as orch` (the names are re-exported there).

- orchestrator.api.client: Client (validate, plan, submit, evaluate, map), local()
- orchestrator.api.handle: Experiment, a submitted experiment (wait, status, results...)
- orchestrator.api.futures: RunFuture, RunResult and as_completed, for evaluations

Each function is the same plain Python the `orchestrator` command calls; errors are the
CLI's classes (orchestrator.errors) with the same messages.
"""
