"""The embedded default: Celery settings that need no server, all under one folder."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from celery import Celery

from pluginhost.transport import ALIAS

__all__ = ["embedded_app", "embedded_conf"]


def embedded_conf(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Celery settings for a broker, result backend and store kept in ``data_dir``.

    The folder is made absolute and created if missing. Messages go through the
    atomic filesystem transport (``pluginhost-fs://``), results and the plugin store
    into SQLite files.
    """
    root = Path(data_dir).expanduser().resolve()
    queue = root / "queue"
    control = root / "control"
    processed = root / "processed"
    for folder in (root, queue, control, processed):
        folder.mkdir(parents=True, exist_ok=True)
    results = root / "results.db"
    _use_wal(results)
    return {
        "broker_url": f"{ALIAS}://",
        "broker_transport_options": {
            "data_folder_in": str(queue),
            "data_folder_out": str(queue),
            # absolute, or each process fans out broadcasts in its own working directory
            "control_folder": str(control),
            "processed_folder": str(processed),
            "store_processed": False,
            # kombu's default of 1 s makes every round trip take about a second
            "polling_interval": 0.01,
        },
        "broker_connection_retry_on_startup": True,
        "result_backend": f"db+sqlite:///{results.as_posix()}",
        # wait for a concurrent writer instead of failing with "database is locked"
        "database_engine_options": {"connect_args": {"timeout": 30}},
        # chords on a database backend poll chord_unlock; the 1 s default sets their pace
        "result_chord_retry_interval": 0.05,
        "result_extended": True,
        "pluginhost_store": f"sqlite:///{(root / 'pluginhost.db').as_posix()}",
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
    }


def embedded_app(name: str, data_dir: str | os.PathLike[str]) -> Celery:
    """A ``Celery(name)`` configured with :func:`embedded_conf`."""
    app = Celery(name)
    app.conf.update(embedded_conf(data_dir))
    return app


def _use_wal(path: Path) -> None:
    # WAL lets readers (result polling, chord_unlock) run while a worker writes; the
    # mode is stored in the database file, so setting it once covers every process.
    db = sqlite3.connect(path, timeout=30)
    try:
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        db.close()
