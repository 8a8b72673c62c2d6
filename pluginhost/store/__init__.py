"""Stores keep plugin records, the audit log and the revision counter."""

from __future__ import annotations

from .base import ChangeFeed, Changes, Store, WorkerRegistry
from .memory import MemoryStore
from .migrate import migrate
from .sql import SQLAlchemyStore


def open_store(url_or_store: str | Store, *, timeout_s: float = 2.0) -> Store:
    """A Store from a URL (``memory://`` or any SQLAlchemy URL), or the store itself.

    ``timeout_s`` is the deadline of every call of a SQL store
    (``pluginhost_store_timeout_s``); a Store instance keeps its own.
    """
    if not isinstance(url_or_store, str):
        return url_or_store
    if url_or_store in ("memory://", "memory:"):
        return MemoryStore()
    return SQLAlchemyStore(url_or_store, timeout_s=timeout_s)


__all__ = [
    "ChangeFeed",
    "Changes",
    "Store",
    "WorkerRegistry",
    "SQLAlchemyStore",
    "MemoryStore",
    "migrate",
    "open_store",
]
