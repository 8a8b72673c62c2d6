"""Alembic environment for the workflows tables."""

from pluginhost.store.migrate import run_env

run_env("workflows_alembic_version")
