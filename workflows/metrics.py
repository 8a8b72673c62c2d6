"""Prometheus metrics of workflow steps and runs (in prometheus-client's default
registry, next to pluginhost's; the console's ``/metrics`` serves both)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

STEP_SECONDS = Histogram(
    "workflows_step_duration_seconds",
    "Workflow step durations by outcome",
    ["step", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
RUNS = Counter("workflows_runs", "Finished workflow runs by outcome", ["workflow", "status"])


def step_finished(step: str, status: str, seconds: float) -> None:
    STEP_SECONDS.labels(step, status).observe(seconds)


def run_finished(workflow: str, status: str) -> None:
    RUNS.labels(workflow, status).inc()
