"""A bare Celery app on the embedded default, for the transport tests' worker.

Its data folder comes from ``PLUGINHOST_TEST_DATA_DIR``.
"""

from __future__ import annotations

import os

from pluginhost.embedded import embedded_app

app = embedded_app("transport_app", os.environ["PLUGINHOST_TEST_DATA_DIR"])


@app.task(name="transport_app.add")
def add(x: int, y: int) -> int:
    return x + y
