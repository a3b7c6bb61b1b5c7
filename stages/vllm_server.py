"""A vLLM server that a stage starts for its rollouts, and stops whatever way the stage ends.

It runs from the interpreter of vLLM's own environment (`grpo.rollout.vllm.python`: vLLM pins
transformers versions alignflow cannot share) through stages/vllm_boot.py, in its own process
group, on a free loopback port, serving a model directory the stage wrote. Its output goes into
the stage's log, each line prefixed `[vllm] `. The stage waits for /health within
`startup_timeout_s`; if the server exits or never answers, the stage fails with one line naming
the interpreter, the port and the server's last lines. Stopping ends the whole group (vLLM's
engine processes too); a stage killed outright is covered by vllm_boot's own watch."""
from __future__ import annotations

import collections
import contextvars
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pydantic import Field

from alignflow.trainers.args import Settings

from .lifeline import stop_process_group
from .vllm_client import EngineError, VLLMClient

log = logging.getLogger("alignflow.stage")
BOOT = Path(__file__).with_name("vllm_boot.py")
NO_VLLM = 3  # vllm_boot's exit code when its interpreter has no vLLM
# Nothing phones home; weight reloads and cache resets need the dev endpoints.
SERVER_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "VLLM_SERVER_DEV_MODE": "1",
              "PYTHONUNBUFFERED": "1"}
PYTHON_ENV = "ALIGNFLOW_VLLM_PYTHON"  # the default interpreter of vLLM's environment


class VLLMConfig(Settings):
    """The vLLM server of a stage whose rollouts it generates (`rollout.engine: vllm`). Where the
    server runs does not change what the stage computes: none of it is in the stage's hash."""
    url: str | None = Field(None, description="an already running server (started with VLLM_SERVER_DEV_MODE=1 and "
                                              "--logprobs-mode processed_logprobs), e.g. on other GPUs; default: "
                                              "the stage starts its own")
    python: str | None = Field(None, description=f"the interpreter of the environment where vLLM is installed (its "
                                                 f"pins clash with alignflow's); default: ${PYTHON_ENV}, else this "
                                                 "one")
    port: int | None = Field(None, ge=1, le=65535, description="the server's port on 127.0.0.1 (default: a free one)")
    sync_dir: str | None = Field(None, description="where the policy's weights are written for the server to read "
                                                   "(default: /dev/shm, memory); with url, a path that server reads")
    dtype: str = Field("auto", description="the server's --dtype (auto: float32 on the CPU, the model's on a GPU)")
    max_model_len: int | None = Field(None, ge=1, description="the server's --max-model-len (default: the model's "
                                                              "context)")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="the share of the stage's GPU the server "
                                                                       "may take beside the trainer")
    cpu_kv_cache_gib: int = Field(1, ge=1, description="on the CPU: its KV cache, GiB (VLLM_CPU_KVCACHE_SPACE)")
    startup_timeout_s: float = Field(600.0, gt=0, description="how long it may take to answer /health")
    request_timeout_s: float = Field(600.0, gt=0, description="how long one generation request may take")
    extra_args: list[str] = Field([], description="more arguments for the server (e.g. [--tensor-parallel-size, 2])")


class EngineStartError(EngineError):
    """The server could not be started; `permanent` when a retry cannot help (no vLLM there)."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_arguments(model_dir: str, port: int, settings, device_type: str) -> list[str]:
    """vLLM's server arguments for `settings` (a VLLMConfig) on a CPU or a GPU."""
    args = ["--model", model_dir, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", settings.dtype if settings.dtype != "auto" else ("float32" if device_type == "cpu" else "auto"),
            # The log-probs of the distribution it sampled from (after temperature, top-k, top-p), which
            # the importance-sampling correction compares with the trainer's.
            "--logprobs-mode", "processed_logprobs",
            # Token ids in, token ids out: the server's tokenizer is never used (its transformers may not
            # read what ours wrote).
            "--skip-tokenizer-init", "--seed", "0", "--disable-uvicorn-access-log"]
    if settings.max_model_len:
        args += ["--max-model-len", str(settings.max_model_len)]
    if device_type == "cpu":
        # vLLM's CPU attention works on blocks of a multiple of 32 tokens; CUDA graphs do not exist there.
        args += ["--enforce-eager", "--block-size", "32"]
    else:
        args += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    return args + list(settings.extra_args)


class VLLMServer:
    """`with VLLMServer(settings, model_dir, device) as client:` a healthy server, stopped on exit."""

    def __init__(self, settings, model_dir: str, device, tail_lines: int = 30):
        self.settings, self.model_dir, self.device = settings, model_dir, device
        self.python = settings.python or os.environ.get(PYTHON_ENV) or sys.executable
        self.port = settings.port or free_port()
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.proc: subprocess.Popen | None = None
        self.stopping = False

    def __enter__(self) -> VLLMClient:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def command(self) -> list[str]:
        # The model directory is the stage's own sync directory: removed if the stage dies.
        return [self.python, str(BOOT), "--watch", str(os.getpid()), "--remove", self.model_dir, "--",
                *server_arguments(self.model_dir, self.port, self.settings, self.device.type)]

    def environment(self) -> dict[str, str]:
        env = {**os.environ, **SERVER_ENV}
        if self.device.type == "cpu":
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.cpu_kv_cache_gib))
            # The model runs inside the engine process, not in a worker process of its own: one
            # interpreter fewer to start (a start took 11.5 s instead of 16.5 s on 2 cores).
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        elif self.device.index is not None:  # colocated: the stage's own GPU
            env["CUDA_VISIBLE_DEVICES"] = _visible_device(self.device.index)
        return env

    def start(self) -> VLLMClient:
        cmd = self.command()
        log.info("starting the vLLM server: %s", " ".join(cmd))
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=self.environment())
        except OSError as e:
            raise EngineStartError(f"cannot start the vLLM server with {self.python} (grpo.rollout.vllm.python): {e}",
                                   permanent=True) from e
        # The reader logs in this thread's context: Prefect's settings (the API URL of the CLI's
        # embedded server) and the task run live in context variables, which a new thread does not
        # inherit; without them Prefect would queue its lines for a server that does not exist.
        threading.Thread(target=contextvars.copy_context().run, args=(self._pump,), daemon=True).start()
        client = VLLMClient(f"http://127.0.0.1:{self.port}", self.settings.request_timeout_s)
        started, deadline = time.monotonic(), time.monotonic() + self.settings.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                time.sleep(0.2)  # the reader's last lines
                code = self.proc.returncode
                raise EngineStartError(self._failure(f"exited with code {code} before it answered"),
                                       permanent=code == NO_VLLM)
            if client.healthy(timeout_s=1.0):
                log.info("vLLM server ready at %s after %.1f s", client.url, time.monotonic() - started)
                return client
            time.sleep(0.5)
        raise EngineStartError(self._failure(f"did not answer /health within {self.settings.startup_timeout_s:g} s "
                                             "(grpo.rollout.vllm.startup_timeout_s)"))

    def explain(self, error: EngineError) -> EngineError:
        """`error` (a request that failed), said as the server's death when it has exited."""
        if self.proc is None or self.proc.poll() is None:
            return error
        time.sleep(0.2)  # the reader's last lines
        return EngineError(self._failure(f"exited with code {self.proc.returncode} while the stage ran"))

    def _failure(self, what: str) -> str:
        last = " | ".join(line for line in self.tail if line.strip())[-1500:]
        return (f"the vLLM server ({self.python}, grpo.rollout.vllm.python; port {self.port}) {what}. "
                f"Its last lines: {last or '(none)'}")

    def _pump(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n").rsplit("\r", 1)[-1]
            self.tail.append(line)
            if not self.stopping:
                log.info("[vllm] %s", line)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.stopping = True  # its shutdown chatter (leak reports, the engine's exit) stays out of the log
        stop_process_group(self.proc, grace=10.0)
        try:  # vLLM's engine processes share the group and may outlive its leader
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _visible_device(index: int) -> str:
    """The stage's GPU as CUDA_VISIBLE_DEVICES names it: index `index` of what the stage itself sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index] if visible else str(index)
