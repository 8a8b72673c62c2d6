"""Alembic environment for pluginhost's tables."""

from pluginhost.store.migrate import run_env

run_env("pluginhost_alembic_version")
