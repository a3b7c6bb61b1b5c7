"""Run a stage under torchrun from a Prefect task: a child process group whose output
streams into the task's logger, polled so task timeouts and cancellation still work, and
killed whole when the task ends for any reason."""
from __future__ import annotations

import collections
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from stages import storage
from stages.config import PipelineConfig


class StageProcessError(RuntimeError):
    """The stage's processes exited non-zero; the message carries the exit code and log tail."""


def torchrun_command(stage: str, config_file: Path, parent: str | None, out_dir: str, nproc: int,
                     nnodes: int, run_id: str, preset: str) -> list[str]:
    # --tee 3: every rank's stdout and stderr, each line prefixed "[default<rank>]:", so the
    # Prefect log shows which rank printed a traceback.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--tee", "3"]
    if nnodes == 1:
        cmd.append("--standalone")  # rendezvous on a free localhost port
    else:
        endpoint = os.environ.get("ALIGNFLOW_RDZV_ENDPOINT")
        if not endpoint:
            raise ValueError(f"nnodes={nnodes} needs ALIGNFLOW_RDZV_ENDPOINT=host:port (the rendezvous of all nodes)")
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id]
    cmd += ["-m", "stages", stage, "--preset", preset, "--config", str(config_file), "--out", str(out_dir)]
    if parent:
        cmd += ["--parent", parent]
    return cmd


RANK_PREFIX = re.compile(r"^\[default(\d+)\]:(?:\[rank\d+\]: ?)?")


class RankTracebacks:
    """What each rank printed from its last "Traceback" on (at most `max_lines` lines), read from
    torchrun's `--tee` output: a failed stage names the failing rank and shows its error rather
    than only torchrun's own summary."""

    def __init__(self, max_lines: int = 40):
        self.max_lines = max_lines
        self.blocks: dict[int, collections.deque[str]] = {}

    def feed(self, line: str) -> None:
        match = RANK_PREFIX.match(line)
        if match is None:
            return
        rank, text = int(match.group(1)), line[match.end():]
        if text.startswith("Traceback"):
            self.blocks[rank] = collections.deque([text], maxlen=self.max_lines)
        elif rank in self.blocks:
            self.blocks[rank].append(text)

    def report(self) -> str:
        return "".join(f"\nrank {rank}:\n" + "\n".join(lines) for rank, lines in sorted(self.blocks.items()))


def _pump(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
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


def run_torchrun(stage: str, config: PipelineConfig, parent: str | None, out_ref: str, logger,
                 poll_seconds: float = 0.5, tail_lines: int = 20) -> None:
    """Launch, stream, wait; raise StageProcessError with the tail of the log on failure.
    `out_ref` is the stage directory (a path or an fsspec URL, which rank 0 publishes to)."""
    t = config.stage(stage).train
    local = storage.local_dir(out_ref)
    local.mkdir(parents=True, exist_ok=True)
    config_file = local / "launch_config.json"
    config_file.write_text(json.dumps(config.model_dump(mode="json"), indent=2))
    cmd = torchrun_command(stage, config_file, parent, out_ref, t.nproc_per_node, t.nnodes,
                           config.resolved_run_id(), config.preset)
    logger.info("launching: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    tracebacks = RankTracebacks()
    try:
        eof = False
        while not eof:
            try:
                line = lines.get(timeout=poll_seconds)
            except queue.Empty:
                continue  # returning to Python here lets a task timeout or cancellation interrupt us
            if line is None:
                eof = True
                continue
            tail.append(line)
            tracebacks.feed(line)
            logger.info(line)
        while proc.poll() is None:
            time.sleep(poll_seconds)
    finally:
        _kill_group(proc)
    if proc.returncode != 0:
        raise StageProcessError(f"stage {stage} failed: torchrun exited with code {proc.returncode}."
                                + tracebacks.report() + "\nLast lines:\n" + "\n".join(tail))
