"""A randomized, recorded test of pluginhost's guarantees, in the style of a
linearizability checker (issue 11).

Real processes record what they did, with ``time.monotonic_ns()`` (one clock for
the whole machine on Linux), while a fault injector breaks the store, the broker
and the workers; afterwards a pure checker proves G1, G2/G3, G4 and G6 from the
merged history, per plugin, and prints the minimal slice of history behind each
violation.

Modules, one concept each:

- ``events``: the append-only per-process JSONL event log, and reading it back.
- ``app``: the Celery app the workers, producers and admins load; its
  capabilities record a body-start event (worker hostname, pid) as their first
  statement.
- ``roles``: the producer and admin processes (``python -m tests.history.roles``).
- ``processes``: starting and stopping the workers and those processes.
- ``faults``: the fault injector (store stalls and cuts, connection kills, a role
  losing LOGIN, a lock on the revision table, worker SIGKILL/SIGSTOP, a broker
  restart, duplicate deliveries), each one undone.
- ``timeline``: the events as admin calls, dispatches, faults and disabled windows.
- ``checker``: the checker, pure: events + final state in, violations out.
- ``run``: the orchestration shared by ``tests/test_history.py`` (short, fixed
  seed) and ``python -m benchmarks soak --minutes N`` (long).
"""
