"""Benchmarks: bare Celery vs pluginhost, measured in the same run (see README.md)."""
