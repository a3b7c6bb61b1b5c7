"""Processes that end when the `alignflow` command that started them is gone.

The CLI starts long-lived helpers in their own sessions (the embedded Prefect server, torchrun
and its ranks), so a Ctrl-C in the terminal reaches only the CLI, which then stops them in
order. If the CLI is killed outright (SIGKILL, OOM killer) nothing would stop them; so each
helper watches the CLI's PID (`$ALIGNFLOW_LIFELINE_PID`) and terminates itself when it is gone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

ENV = "ALIGNFLOW_LIFELINE_PID"


def alive(pid: int) -> bool:
    """Whether `pid` runs. A zombie (dead, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (macOS): kill(0) succeeded, so it runs
        return True


def watch(pid: int | None = None, poll_seconds: float = 1.0, grace_seconds: float = 10.0) -> threading.Thread | None:
    """Start a daemon thread that SIGTERMs this process once `pid` (default: $ALIGNFLOW_LIFELINE_PID)
    is gone, and hard-exits it `grace_seconds` later if the SIGTERM did not end it. Nothing when
    no PID is given (a process started by hand)."""
    pid = pid or int(os.environ.get(ENV) or 0)
    if not pid or pid == os.getpid():
        return None

    def run() -> None:
        while alive(pid):
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_seconds)
        os._exit(143)

    thread = threading.Thread(target=run, name="alignflow-lifeline", daemon=True)
    thread.start()
    return thread


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the whole process group (torchrun and its ranks), SIGKILL what is left."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
