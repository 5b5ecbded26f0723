"""Prefect flows: they only orchestrate tasks from `tasks/`."""
