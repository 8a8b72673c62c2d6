"""A workflow definition becomes a Celery canvas.

Sequential steps are links of a ``chain``; a ``Parallel`` is a ``chord`` whose
callback merges the branch outputs in declaration order; a final task records
the run's outcome and returns the context. The chain's last task id is the
run id, so the caller's AsyncResult resolves to the final context.

A wait (``Sleep``, ``WaitFor``) ends the canvas: its task records the wait and
sends nothing; the worker that wakes the run builds the canvas of the stages
after it (``from_stage``) with the same run id. The wait task keeps no result,
so the run id's result is the one the last segment stores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import chain, chord
from celery.canvas import Signature

from .definition import Parallel, Sleep, Step, WaitFor, Workflow

if TYPE_CHECKING:
    from .runtime import Runtime


#: Runtime.run_step's policy defaults (compile leaves these out of messages).
STEP_DEFAULTS: dict[str, Any] = {
    "on_disabled": "skip",
    "retries": 0,
    "retry_backoff": 1.0,
    "parallel": False,
    "first": False,
    "final": False,
    "gate": None,
    "when": None,
}


def _step_task(rt: Runtime, slug: str, kwargs: dict[str, Any]) -> Any:
    """The task of a step of ``slug``: its capability's step task, which names the
    capability (no ``slug`` in the message) and runs on its queue with its options
    (``CapabilityStepTask``); the generic one, told ``slug``, for a slug that is
    not a capability here."""
    task = rt.step_task_for(slug)
    if task is None:
        kwargs["slug"] = slug
        return rt.step_task
    return task


def layout(workflow: Workflow) -> list[tuple[int, int, str]]:
    """(position, stage, slug) of every step."""
    rows = []
    position = 0
    for stage, steps in enumerate(workflow.stages()):
        for step in steps:
            rows.append((position, stage, step.slug))
            position += 1
    return rows


def build(
    rt: Runtime,
    workflow: Workflow,
    run_id: str,
    context: dict[str, Any],
    *,
    from_stage: int = 0,
    done: dict[int, dict[str, Any]] | None = None,
    gate: tuple[str, str] | None = None,
) -> Signature:
    """The canvas for ``workflow`` from ``from_stage`` on. ``done`` holds the
    recorded outputs of steps of that stage that already finished (a resumed
    parallel stage reruns only the rest). ``gate``: (capability, plugin) that the
    first stage's steps check before running (a run started without the
    capability task: ``WorkflowCapability.dispatch``)."""
    done = done or {}
    stages = list(zip(workflow.steps, workflow.stages()))
    first_positions = range(len(stages[0][1])) if stages else range(0)
    links: list[Signature] = []
    position = 0

    def step_sig(pos: int, step: Step, parallel: bool, final: bool) -> Signature:
        args: tuple[Any, ...] = (run_id, pos) if links else (context, run_id, pos)
        # A step that only feeds the next one keeps no result in the backend: its
        # output is in its step row (errors are still stored: the task sets
        # store_errors_even_if_ignored). Chord branches and the last step keep theirs.
        options: dict[str, Any] = {} if parallel or final else {"ignore_result": True}
        if step.timeout is not None:
            options["soft_time_limit"] = step.timeout
        policy = {
            "on_disabled": step.on_disabled,
            "retries": step.retries,
            "retry_backoff": step.retry_backoff,
            "parallel": parallel,
            "first": pos in first_positions,
            "final": final,
            "gate": list(gate) if gate is not None and pos in first_positions else None,
            "when": step.when,
        }
        # Only what differs from Runtime.run_step's defaults: every message
        # carries the rest of the chain, so each step's kwargs are sent again
        # with every step before it.
        kwargs = {k: v for k, v in policy.items() if v != STEP_DEFAULTS[k]}
        return _step_task(rt, step.slug, kwargs).signature(args, kwargs, **options)

    def wait_sig(stage: int, wait: Sleep | WaitFor) -> Signature:
        args: tuple[Any, ...] = (run_id, stage) if links else (context, run_id, stage)
        if isinstance(wait, Sleep):
            kwargs: dict[str, Any] = {"kind": "sleep", "seconds": wait.duration}
        else:
            kwargs = {"kind": "signal", "signal": wait.signal, "seconds": wait.timeout, "on_timeout": wait.on_timeout}
        return rt.wait_task.signature(args, kwargs, ignore_result=True)

    for stage_index, (stage_def, steps) in enumerate(stages):
        positions = list(range(position, position + len(steps)))
        position += len(steps)
        if stage_index < from_stage:
            continue
        if isinstance(stage_def, (Sleep, WaitFor)):
            links.append(wait_sig(stage_index, stage_def))
            break  # the rest is sent when the run wakes
        final = stage_index == len(stages) - 1
        todo = [(p, s) for p, s in zip(positions, steps) if p not in done]
        if isinstance(stage_def, Parallel):
            recorded = {str(p): done[p] for p in positions if p in done}
            merge_kwargs = {k: v for k, v in (("done", recorded), ("final", final)) if v}
            merge_options = {} if final else {"ignore_result": True}
            if todo:
                header = [step_sig(p, s, True, False) for p, s in todo]
                merge = rt.merge_task.signature((run_id, stage_index), merge_kwargs, **merge_options)
                links.append(chord(header, merge))
            else:
                args = (run_id, stage_index) if links else (context, run_id, stage_index)
                links.append(rt.merge_task.signature(args, merge_kwargs, **merge_options))
        elif todo:
            links.append(step_sig(todo[0][0], todo[0][1], False, final))
    if not links:
        links.append(rt.finish_task.signature((context, run_id)))
    # One link (one step, or one parallel stage) goes as it is: a chain around a
    # chord costs the producer another canvas pass, with the same result id.
    return links[0] if len(links) == 1 else chain(*links)
