"""Celery app modules that benchmark workers load (configured from env vars)."""
