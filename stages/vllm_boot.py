"""Started by path with the interpreter of vLLM's own environment (which has no alignflow):

    VLLM_PYTHON stages/vllm_boot.py --watch PID [--remove DIR] -- <vllm api_server arguments>

It runs vLLM's OpenAI-compatible server in this process, the leader of its own process group
(the stage starts it so), after starting a thread that ends the whole group once process PID
(the stage that started it) is gone: a stage killed outright (SIGKILL, the OOM killer) cannot
stop its server, and vLLM's engine processes would otherwise hold the memory and the port.
It first removes DIR, the stage's weight directory (in /dev/shm: memory the stage can no
longer free).
Standard library only: it must import in an environment that has only vLLM.

Exit code 3, with one line, when this interpreter cannot import vLLM."""
from __future__ import annotations

import os
import runpy
import shutil
import signal
import sys
import threading
import time

NO_VLLM = 3


def alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (dead, not yet reaped) counts as gone. stages.lifeline.alive,
    copied: this file runs in vLLM's environment, where alignflow cannot be imported."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def watch(pid: int, remove: str | None, poll_seconds: float = 0.5, grace_seconds: float = 10.0) -> None:
    def run() -> None:
        while alive(pid):
            time.sleep(poll_seconds)
        if remove:
            shutil.rmtree(remove, ignore_errors=True)
        try:  # the stage read our output: the pipe is likely broken now
            print(f"vllm_boot: process {pid}, which started this server, is gone: stopping the server", flush=True)
        except OSError:
            pass
        group = os.getpgrp()
        os.killpg(group, signal.SIGTERM)
        time.sleep(grace_seconds)
        os.killpg(group, signal.SIGKILL)

    threading.Thread(target=run, name="alignflow-vllm-lifeline", daemon=True).start()


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "--watch" or "--" not in argv:
        sys.exit("usage: vllm_boot.py --watch PID [--remove DIR] -- <vllm server arguments>")
    split = argv.index("--")
    remove = argv[3] if argv[2:4] and argv[2] == "--remove" and split > 3 else None
    watch(int(argv[1]), remove)
    try:
        import vllm  # noqa: F401  (only to fail early, with one line)
    except ImportError as e:
        print(f"vllm_boot: {sys.executable} cannot import vllm ({e}): point grpo.rollout.vllm.python at the "
              "interpreter of an environment where vLLM is installed", flush=True)
        sys.exit(NO_VLLM)
    sys.argv = ["vllm-api-server", *argv[split + 1:]]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
