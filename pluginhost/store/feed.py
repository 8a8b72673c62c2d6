"""The change feed of a SQL store: what changed after a revision, read in one
statement (migration 0003 keeps ``change_revision`` and ``pluginhost_deletions``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import BigInteger, Connection, bindparam, cast, literal_column, null, select, union_all
from sqlalchemy.exc import DBAPIError

from ..model import Plugin
from . import schema
from .base import Changes

#: A record's columns (not change_revision: loads work on a schema before 0003).
RECORD_COLUMNS = [c for c in schema.plugins.c if c.name != "change_revision"]
_NAMES = [c.name for c in RECORD_COLUMNS]


def read_changes(conn: Connection, since: int, to_plugin: Callable[[dict[str, Any]], Plugin]) -> Changes | None:
    """The records changed and the slugs deleted after revision ``since``, and the
    revision they are consistent at; None when that cannot be proven complete:
    ``since`` below the horizon (deletions pruned past it, a TRUNCATE, a view
    older than the upgrade to 0003), ahead of the store's revision (a restored
    database), or a schema before 0003."""
    try:
        rows = conn.execute(_CHANGES, {"since": since}).all()
    except DBAPIError as exc:
        if _is_old_schema(exc):
            return None
        raise
    head = [r for r in rows if r[0] == 0]
    if len(head) != 1:
        return None
    revision, horizon = int(head[0][1]), int(head[0][2])
    if since < horizon or since > revision:
        return None
    changed = [to_plugin(dict(zip(_NAMES, r[3:]))) for r in rows if r[0] == 1]
    return Changes(revision, changed, [r[3] for r in rows if r[0] == 2])


def _changes_query() -> Any:
    """One statement, so one snapshot on any isolation level and one round trip.
    Rows of three parts (0: the revision row, 1: changed records, 2: deleted
    slugs), each ``(part, revision, horizon, *record columns)``."""
    rev, plugins, deletions = schema.revision, schema.plugins, schema.deletions
    since = bindparam("since", type_=BigInteger())
    no_horizon = cast(null(), BigInteger())

    def nulls(columns: Iterable[Any]) -> list[Any]:
        return [cast(null(), c.type) for c in columns]

    head = select(
        literal_column("0").label("part"), rev.c.revision.label("at"), rev.c.horizon.label("horizon"),
        *(n.label(name) for n, name in zip(nulls(RECORD_COLUMNS), _NAMES)),
    ).where(rev.c.id == 1)  # fmt: skip
    changed = select(literal_column("1"), plugins.c.change_revision, no_horizon, *RECORD_COLUMNS).where(
        plugins.c.change_revision > since
    )
    gone = select(
        literal_column("2"), deletions.c.change_revision, no_horizon, deletions.c.slug, *nulls(RECORD_COLUMNS[1:])
    ).where(
        deletions.c.change_revision > since,
        # deleted and not there now: also right when a deletion's row outlived a
        # reset of the revision counter
        ~select(plugins.c.slug).where(plugins.c.slug == deletions.c.slug).exists(),
    )
    return union_all(head, changed, gone)


_CHANGES = _changes_query()


def _is_old_schema(exc: DBAPIError) -> bool:
    """Whether ``exc`` says the schema has no change revisions (before 0003)."""
    if getattr(exc.orig, "sqlstate", None) in ("42703", "42P01"):  # undefined column / table
        return True
    text = str(exc.orig).lower()
    return "no such column" in text or "no such table" in text
