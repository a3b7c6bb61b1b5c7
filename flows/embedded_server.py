"""The Prefect server the CLI runs flows on when no PREFECT_API_URL is set.

Prefect would start its own temporary server as a child in the CLI's process group; a Ctrl-C
in the terminal then kills that server first, and the CLI spends minutes retrying to report
the interrupted run to it. So the CLI starts the same server (Prefect's app under uvicorn, on a
free loopback port, UI off, as Prefect does) in its own session, points the Prefect client at
it, and stops it last. The server watches the CLI's PID (stages.lifeline): if the CLI is
killed outright, the server exits by itself within seconds.

`python -m alignflow.flows.embedded_server PORT` is the server process itself.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from alignflow.stages import lifeline

from alignflow.stages.lifeline import stop_process_group

STARTUP_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
PORT_IN_USE = 3  # uvicorn's exit code when it cannot bind


def needed() -> bool:
    """Whether flows in this process would otherwise start Prefect's temporary server."""
    from prefect.settings import PREFECT_API_URL

    return not PREFECT_API_URL.value()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _start(timeout: float) -> tuple[subprocess.Popen, str]:
    from prefect.settings import get_current_settings

    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           lifeline.ENV: str(os.getpid()), "PREFECT_UI_ENABLED": "0",
           "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "alignflow.flows.embedded_server", str(port)], env=env,
                                start_new_session=True)  # out of the terminal's Ctrl-C
        url = f"http://127.0.0.1:{port}/api"
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if _healthy(url):
                    return proc, url
                time.sleep(0.2)
        except BaseException:  # Ctrl-C while it starts: serving() has no hold of it yet, so stop it here
            stop_process_group(proc, grace=5.0)  # (its lifeline would, but only once its imports are done)
            raise
        if proc.poll() != PORT_IN_USE:  # another process took the port in between: try another
            break
    stop_process_group(proc, grace=5.0)
    raise RuntimeError(f"the embedded Prefect server did not start within {timeout:.0f} s "
                       f"(exit code {proc.poll()}); raise {STARTUP_ENV}, or set PREFECT_API_URL to a running server")


@contextlib.contextmanager
def serving() -> Iterator[str | None]:
    """Run the body against our own embedded server (its API URL), or against the configured
    server when PREFECT_API_URL is set (yields None)."""
    if not needed():
        yield None
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    proc, url = _start(float(os.environ.get(STARTUP_ENV, "120")))
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain(timeout=5.0)
    finally:
        stop_process_group(proc, grace=5.0)


def _drain(timeout: float) -> None:
    """Send the logs and events still queued while the server is up: Prefect's workers would
    otherwise retry against the stopped server for minutes at exit."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)


def main(port: int) -> None:
    import uvicorn

    lifeline.watch()
    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=port,
                log_level="error", lifespan="on")


if __name__ == "__main__":
    main(int(sys.argv[1]))
