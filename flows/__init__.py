"""Prefect flows and the `alignflow` command line.

Defaults for running with no network: no analytics, and enough time for the embedded
server's first start on a fresh database (15-25 s on a small machine). Set before Prefect
is imported anywhere; explicit environment settings win."""
import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
