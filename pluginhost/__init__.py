"""pluginhost: a database-driven runtime plugin/capability registry for Celery."""

from . import errors
from .capability import CapabilityContext
from .embedded import embedded_app, embedded_conf
from .errors import *  # noqa: F403  (the error classes: errors.__all__)
from .host import PluginHost
from .model import (
    MASK,
    SORT_MAX,
    SORT_MIN,
    AuditEntry,
    Kind,
    Plugin,
    check_json_object,
    did_you_mean,
    is_secret_key,
    mask_secrets,
    secret_fields,
)
from .store import MemoryStore, SQLAlchemyStore, Store

__version__ = "0.1.0"

__all__ = [
    "PluginHost",
    "Plugin",
    "Kind",
    "AuditEntry",
    "mask_secrets",
    "is_secret_key",
    "secret_fields",
    "check_json_object",
    "did_you_mean",
    "MASK",
    "SORT_MIN",
    "SORT_MAX",
    "CapabilityContext",
    "Store",
    "SQLAlchemyStore",
    "MemoryStore",
    *errors.__all__,  # the error classes, listed once: in errors.py
    "embedded_app",
    "embedded_conf",
]
