"""Prefect flows and the `alignflow` command line."""
