"""Server-rendered SVG diagrams of workflows: stages left to right, the branches
of a parallel stage stacked, each step coloured (and labelled) by its state; a
``Sleep`` or ``WaitFor`` stage is a smaller, rounder node."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby

from markupsafe import Markup, escape

from .schemas import PlanRow, StepRow, WaitRow

BOX_W, BOX_H = 168, 46
GAP_X, GAP_Y, PAD = 44, 14, 12
MAX_CHARS = 22

#: state -> (fill, stroke, dashed)
PALETTE: dict[str, tuple[str, str, bool]] = {
    "run": ("#e6f4ea", "#1e8e3e", False),
    "succeeded": ("#e6f4ea", "#1e8e3e", False),
    "skip": ("#f1f3f4", "#5f6368", True),
    "skipped": ("#f1f3f4", "#5f6368", True),
    "fail": ("#fce8e6", "#c5221f", False),
    "failed": ("#fce8e6", "#c5221f", False),
    "running": ("#e8f0fe", "#1a73e8", False),
    "pending": ("#ffffff", "#9aa0a6", False),
    "cancelled": ("#f1f3f4", "#9aa0a6", True),
    "wait": ("#fef7e0", "#b06000", False),
    "sleeping": ("#fef7e0", "#b06000", False),
    "waiting": ("#fef7e0", "#b06000", False),
    "claimed": ("#e8f0fe", "#1a73e8", False),
    "slept": ("#e6f4ea", "#1e8e3e", False),
    "received": ("#e6f4ea", "#1e8e3e", False),
    "timed_out": ("#fce8e6", "#c5221f", True),
}
#: A wait node's height (a step's is BOX_H).
WAIT_H = 30


@dataclass(frozen=True)
class Box:
    """One step: its stage, name, state (a PALETTE key) and the line shown under the name."""

    stage: int
    label: str
    state: str
    note: str
    wait: bool = False


def plan_boxes(plan: Sequence[PlanRow], waits: Sequence[WaitRow] = ()) -> list[Box]:
    """Boxes for a dry run: green if the step's plugin is enabled, else what happens to it."""
    boxes = [Box(p.stage, p.slug, p.outcome, "enabled" if p.enabled else f"disabled: {p.outcome}") for p in plan]
    return boxes + [Box(w.stage, w.label, "wait", _wait_note(w), wait=True) for w in waits]


def run_boxes(steps: Sequence[StepRow], waits: Sequence[WaitRow] = ()) -> list[Box]:
    """Boxes for a run, by step status; a wait by how far the run got with it."""
    boxes = [Box(s.stage, s.slug, s.status, s.status) for s in steps]
    return boxes + [Box(w.stage, w.label, _wait_state(w), _wait_state(w).replace("_", " "), wait=True) for w in waits]


def _wait_state(wait: WaitRow) -> str:
    if wait.status == "waiting":
        return "sleeping" if wait.kind == "sleep" else "waiting"
    if wait.status == "done" and wait.outcome:
        return wait.outcome
    return wait.status  # pending, claimed, cancelled


def _wait_note(wait: WaitRow) -> str:
    if wait.kind == "sleep":
        return "sleep"
    return "no timeout" if wait.duration_s is None else f"then {wait.on_timeout or 'fail'} on timeout"


def render(boxes: Sequence[Box], *, title: str, ident: str) -> Markup:
    """The SVG (safe to inline: every text is escaped). ``ident`` keeps ids unique on a page."""
    stages = [list(group) for _, group in groupby(sorted(boxes, key=lambda b: b.stage), key=lambda b: b.stage)]
    rows = max((len(s) for s in stages), default=1)
    width = PAD * 2 + len(stages) * BOX_W + max(len(stages) - 1, 0) * GAP_X
    height = PAD * 2 + rows * BOX_H + (rows - 1) * GAP_Y
    marker = f"arrow-{ident}"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="diagram" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<defs><marker id="{escape(marker)}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#5f6368"/></marker></defs>',
    ]
    previous: list[tuple[float, float]] = []
    for column, stage in enumerate(stages):
        x = PAD + column * (BOX_W + GAP_X)
        top = PAD + (height - 2 * PAD - (len(stage) * BOX_H + (len(stage) - 1) * GAP_Y)) / 2
        current: list[tuple[float, float]] = []
        for row, box in enumerate(stage):
            y = top + row * (BOX_H + GAP_Y)
            for px, py in previous:
                parts.append(
                    f'<line x1="{px:.0f}" y1="{py:.0f}" x2="{x:.0f}" y2="{y + BOX_H / 2:.0f}" '
                    f'stroke="#5f6368" stroke-width="1.5" marker-end="url(#{escape(marker)})"/>'
                )
            parts.append(_box(box, x, y))
            current.append((x + BOX_W, y + BOX_H / 2))
        previous = current
    parts.append("</svg>")
    return Markup("".join(parts))


def _box(box: Box, x: float, y: float) -> str:
    """A step's box (its label and note), or a wait's smaller rounded one (its label)."""
    fill, stroke, dashed = PALETTE.get(box.state, ("#ffffff", "#9aa0a6", False))
    dash = ' stroke-dasharray="5 3"' if dashed else ""
    label = box.label if len(box.label) <= MAX_CHARS else box.label[: MAX_CHARS - 1] + "\u2026"
    kind, height = ("wait", WAIT_H) if box.wait else ("step", BOX_H)
    top = y + (BOX_H - height) / 2
    rx = f"{WAIT_H / 2:.0f}" if box.wait else "6"
    middle, state = x + BOX_W / 2, escape(box.state)
    if box.wait:
        texts = (
            f'<text x="{middle:.0f}" y="{top + 19:.0f}" text-anchor="middle" font-family="sans-serif" '
            f'font-size="12" fill="#202124">{escape(label)}</text>'
        )
    else:
        texts = (
            f'<text x="{middle:.0f}" y="{top + 19:.0f}" text-anchor="middle" font-family="sans-serif" '
            f'font-size="13" font-weight="600" fill="#202124">{escape(label)}</text>'
            f'<text x="{middle:.0f}" y="{top + 36:.0f}" text-anchor="middle" font-family="sans-serif" '
            f'font-size="11" fill="{stroke}">{escape(box.note)}</text>'
        )
    return (
        f'<g class="{kind} {kind}-{state}" data-slug="{escape(box.label)}" data-state="{state}">'
        f"<title>{escape(box.label)}: {escape(box.note)}</title>"
        f'<rect x="{x:.0f}" y="{top:.0f}" width="{BOX_W}" height="{height}" rx="{rx}" fill="{fill}" '
        f'stroke="{stroke}" stroke-width="1.5"{dash}/>{texts}</g>'
    )
