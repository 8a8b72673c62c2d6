"""The error hierarchy. Every error takes one message argument, so Celery's JSON
result transport rebuilds it as the same class with the same message."""

from __future__ import annotations


class PluginHostError(Exception):
    """Base of every error pluginhost raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PluginNotFound(PluginHostError):
    """No plugin with that slug is in the store."""


class CapabilityNotFound(PluginHostError):
    """No capability with that slug was declared on this host."""


class CapabilityDisabled(PluginHostError):
    """The capability's plugin is disabled in the store."""


class InvalidPlugin(PluginHostError):
    """A plugin record is malformed: bad slug, kind, label or field."""


class InvalidConfig(PluginHostError):
    """A config is not a JSON object or fails the plugin's config model."""


class InvalidInput(PluginHostError):
    """A capability input is not a JSON object or fails its input model."""


class InvalidArgument(PluginHostError):
    """A call argument is malformed or out of range: a negative ``limit``, an
    ``actor`` that is not text PostgreSQL can store (a NUL byte, a lone surrogate)."""


class ConcurrentUpdate(PluginHostError):
    """The record changed since the version the caller expected."""


class StoreUnavailable(PluginHostError):
    """The store cannot be reached; nothing was written or enqueued."""


__all__ = [
    "PluginHostError",
    "PluginNotFound",
    "CapabilityNotFound",
    "CapabilityDisabled",
    "InvalidPlugin",
    "InvalidConfig",
    "InvalidInput",
    "InvalidArgument",
    "ConcurrentUpdate",
    "StoreUnavailable",
]
