"""Stores keep plugin records, the audit log and the revision counter."""

from __future__ import annotations

from .base import Store, WorkerRegistry
from .memory import MemoryStore
from .migrate import migrate
from .sql import SQLAlchemyStore


def open_store(url_or_store: str | Store) -> Store:
    """A Store from a URL (``memory://`` or any SQLAlchemy URL), or the store itself."""
    if not isinstance(url_or_store, str):
        return url_or_store
    if url_or_store in ("memory://", "memory:"):
        return MemoryStore()
    return SQLAlchemyStore(url_or_store)


__all__ = ["Store", "WorkerRegistry", "SQLAlchemyStore", "MemoryStore", "migrate", "open_store"]
