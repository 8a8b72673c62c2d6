"""``GET /metrics``: prometheus-client's registry, behind the console's auth.

With ``PROMETHEUS_MULTIPROC_DIR`` set, the samples every process wrote to that
folder are merged (``MultiProcessCollector``); otherwise this process's registry
is served. Prometheus scrapes it with the console's Bearer token
(``authorization: {credentials: <token>}`` in the scrape config).
"""

from __future__ import annotations

import os

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from .auth import require_identity

router = APIRouter(dependencies=[Depends(require_identity)], include_in_schema=False)


def registry() -> CollectorRegistry:
    """The registry to expose: a merged multi-process one if the folder is set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return merged
    return REGISTRY


@router.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(registry()), media_type=CONTENT_TYPE_LATEST)
